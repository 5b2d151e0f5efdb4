"""Refactored equals before: the toolkit's outputs on fixed tiny inputs equal the recorded goldens.

Bit-identical (sha256 of every tensor, exact losses and JSON) on a machine like the recording one (same torch
and CPU kernel set); elsewhere, where CPU kernels may round differently, within a small tolerance.
Re-record only for an intended behaviour change, and say so in the commit: `python scripts/record_goldens.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from golden_runs import compute, machine

GOLDENS = Path(__file__).with_name("goldens.json")


def _compare(got, want, exact: bool, path: str = "") -> list[str]:
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: keys differ: missing {sorted(set(want) - set(got))[:5]}, "
                    f"extra {sorted(set(got) - set(want))[:5]}"]
        return [e for k in want for e in _compare(got[k], want[k], exact, f"{path}/{k}")]
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [e for i, (g, w) in enumerate(zip(got, want)) for e in _compare(g, w, exact, f"{path}[{i}]")]
    if path.endswith("/sha256") and not exact:
        return []
    if isinstance(want, float) and not exact:
        ok = math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5) or (math.isnan(got) and math.isnan(want))
        return [] if ok else [f"{path}: {got!r} != {want!r}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_outputs_equal_the_recorded_goldens(tmp_path):
    if not GOLDENS.is_file():
        pytest.fail("tests/golden/goldens.json is missing: run `python scripts/record_goldens.py`")
    recorded = json.loads(GOLDENS.read_text())
    exact = recorded["machine"] == machine()
    errors = _compare(compute(tmp_path), recorded["goldens"], exact)
    assert not errors, f"{len(errors)} outputs differ ({'bit-identical' if exact else 'tolerance'} check):\n" + \
        "\n".join(errors[:20])
