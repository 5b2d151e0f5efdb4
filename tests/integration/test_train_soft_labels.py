"""Soft labels end to end: a 3-step `diffusion-dpo train` with loss.soft_labels=true on a manifest with margins."""

from __future__ import annotations

import json
import math

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest


@pytest.mark.fault(input="`train` with `loss.soft_labels=true` and data without `pref_prob` / `margin`",
                   behaviour="exit 2 before any model loads: names loss.soft_labels and the columns")
@pytest.mark.parametrize("column", ["margin", None])
def test_three_soft_label_steps(column, tmp_path, tiny_sd, capsys):
    source = write_manifest(tmp_path / "data", n=4, columns={column or "note": [1.5, -0.5, 3.0, 0.2]})
    out = tmp_path / "run"
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={source}", "data.resolution=32",
                 "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=0", "lora.rank=4",
                 "output.report_to=none", f"output.dir={out}", "train.beta=500", "loss.soft_labels=true",
                 "loss.soft_label_temperature=2"])
    if column is None:
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "loss.soft_labels=true" in err[0] and "pref_prob" in err[0] and "margin" in err[0]
        return
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: ln 2 whatever p is
    assert rows[0]["grad_norm"] > 0
    cfg = load_config(out / "config.yaml")
    assert cfg.loss.soft_labels and cfg.loss.soft_label_temperature == 2
