"""`train` runs that must fail with one line, never report success: nothing trained, a checkpoint of
other LoRA shapes."""

from __future__ import annotations

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest, write_pickapic_parquet
from diffusion_dpo.errors import NonFiniteLossError
from diffusion_dpo.models.families import ModelFamily
from diffusion_dpo.train import trainer as trainer_mod


def _args(model, source, out, *extra) -> list[str]:
    return ["train", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "train.max_steps=2",
            "train.batch_size=2", "train.checkpoint_every=0", "lora.rank=4", "output.report_to=none",
            f"output.dir={out}", *extra]


@pytest.mark.fault(input="every pair's images undecodable (`data.on_corrupt=skip`)",
                   behaviour="exit 2 after one pass over the data: no pair was trained, with the counts")
def test_run_where_every_pair_is_corrupt_fails(tmp_path, tiny_sd, capsys):
    source = write_pickapic_parquet(tmp_path / "bad.parquet", n=4, corrupt=4)
    out = tmp_path / "o"
    assert main(_args(tiny_sd, source, out, "train.max_steps=1000")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no pair was trained in 2 steps over 4 pairs")  # one epoch, not 1000 steps
    assert "4 pairs skipped as corrupt" in err
    assert not (out / "README.md").exists()  # no model card for a run that learned nothing


@pytest.mark.fault(input="every step non-finite with `train.on_nonfinite=skip`",
                   behaviour="error at the end: no pair was trained (not 'training finished')")
def test_run_where_every_step_was_skipped_fails(tmp_path, tiny_sd, monkeypatch):
    source = write_manifest(tmp_path / "data", n=4)
    real = trainer_mod.preference_step

    def always_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "preference_step", always_nan)
    cfg = load_config(None, _args(tiny_sd, source, tmp_path / "o", "train.max_steps=1", "train.batch_size=1",
                                  "train.on_nonfinite=skip")[1:])
    with pytest.raises(NonFiniteLossError, match="no pair was trained in 1 steps .* 1 steps skipped as non-finite"):
        trainer_mod.train(cfg, progress=False)


@pytest.mark.fault(input="resume with another `lora.rank` than the run's checkpoint",
                   behaviour="exit 2: one line naming `lora.rank` there and here")
def test_resume_with_another_lora_rank_is_one_line(tmp_path, tiny_sd, capsys):
    source = write_manifest(tmp_path / "data", n=4)
    out = tmp_path / "o"
    assert main(_args(tiny_sd, source, out, "train.max_steps=1")) == 0
    capsys.readouterr()
    assert main(_args(tiny_sd, source, out, "train.max_steps=2", "lora.rank=8")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    # the run-directory check (config.yaml of the checkpoint) names it before any tensor is read; the checkpoint's
    # own shape check (tests/unit/train/test_checkpoint.py) covers checkpoints without a readable config.yaml
    assert last.startswith("error: cannot resume ") and "lora.rank" in last and "4" in last and "8" in last


@pytest.mark.fault(input="Ctrl-C while models and data load", behaviour="exit 2: one line, where a rerun starts")
def test_ctrl_c_during_setup_is_one_line(tmp_path, tiny_sd, monkeypatch, capsys):
    source = write_manifest(tmp_path / "data", n=4)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelFamily, "load_network", ctrl_c)
    assert main(_args(tiny_sd, source, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: interrupted while loading models and data; rerun the same command to start"
