"""Every loss in the table trains end to end: a 3-step `diffusion-dpo train` run on the tiny SD model."""

from __future__ import annotations

import json
import math

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_pickapic_parquet
from diffusion_dpo.losses import LOSSES


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("pp") / "train.parquet", n=6, ties=0)


# dpo and sft have their own end-to-end tests (test_train_cli.py); the settings exercise each loss's keys
RUNS = {"ipo": [], "hinge": [], "cdpo": ["loss.label_smoothing=0.2"], "rdpo": ["loss.label_smoothing=0.2"],
        "kto": ["loss.kto_undesirable_weight=1.5"], "mapo": ["loss.mapo_weight=0.2"], "simpo": ["loss.simpo_gamma=0.3"]}


def test_every_new_loss_has_a_run():
    # dpo and sft run in test_train_cli.py; consistency_dpo (an LCM student and a teacher) in test_train_consistency.py
    assert set(RUNS) == set(LOSSES) - {"dpo", "sft", "consistency_dpo"}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_three_steps_with_each_loss(method, tmp_path, tiny_sd, pickapic):
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={pickapic}", "data.resolution=32",
                 "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=0", "train.learning_rate=1e-2",
                 "lora.rank=4", "output.report_to=none", f"output.dir={tmp_path}", f"train.method={method}",
                 "train.beta=500", *RUNS[method]])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[0]["grad_norm"] > 0  # the loss reaches the adapter
    cfg = load_config(tmp_path / "config.yaml")  # the saved config holds the loss settings and reloads
    assert cfg.train.method == method
    reference_free = not LOSSES[method].needs_reference
    assert ("err_ref_w" in rows[0]) is not reference_free  # no reference forward for mapo / simpo
    first = rows[0]["loss"]
    if method in ("cdpo", "rdpo"):  # policy == reference at step 1: the logistic losses start at ln 2
        assert first == pytest.approx(math.log(2), abs=1e-5)
    elif method == "hinge":
        assert first == pytest.approx(1.0, abs=1e-5)
    elif method == "kto":  # lambda_d / 2 and lambda_u / 2 over as many desirable as undesirable images
        assert first == pytest.approx((1.0 + 1.5) / 4, abs=1e-5)
    elif method == "ipo":  # 1 / (4 tau^2)
        assert first == pytest.approx(1 / (4 * 500.0**2), rel=1e-3)
