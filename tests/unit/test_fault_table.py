"""docs/faults.md is generated from the fault-marked tests: it must list exactly the current cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fault_table_is_current(tmp_path):
    out = tmp_path / "faults.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_table.py"), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| --- | --- | --- |" in out.read_text()
    assert out.read_text() == (ROOT / "docs" / "faults.md").read_text(), \
        "docs/faults.md is stale: run `python scripts/fault_table.py`"
