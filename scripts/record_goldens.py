"""Record the golden outputs that tests/golden/test_golden.py compares against.

    OMP_NUM_THREADS=1 python scripts/record_goldens.py

Run it only when a behaviour change is intended, and say which in the commit message.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("OMP_NUM_THREADS", "1"),
                   ("TOKENIZERS_PARALLELISM", "false"), ("DIFFUSERS_VERBOSITY", "error"),
                   ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(key, value)  # the same environment as tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "golden"))

import torch  # noqa: E402
from golden_runs import compute, dumps  # noqa: E402


def main() -> int:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        goldens = compute(Path(tmp))
    out = ROOT / "tests" / "golden" / "goldens.json"
    out.write_text(dumps(goldens))
    print(f"wrote {out} ({len(goldens)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
