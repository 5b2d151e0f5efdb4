"""train.method=consistency_dpo end to end on the tiny LCM pipeline with the tiny SD pipeline as its teacher, and
its config faults."""

from __future__ import annotations

import json

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.data.synthetic import write_pickapic_parquet


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("pp") / "train.parquet", n=8, ties=0)


def _args(out, model, source, *extra):
    return ["train", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "train.max_steps=3",
            "train.batch_size=2", "train.checkpoint_every=0", "train.learning_rate=1e-2", "lora.rank=4",
            "output.report_to=none", f"output.dir={out}", "train.method=consistency_dpo", *extra]


def test_three_step_run_trains_the_lcm_lora(tmp_path, tiny_lcm, tiny_sd, pickapic):
    # lora.target_modules unset: the method's default, the LCM-LoRA set
    assert main(_args(tmp_path, tiny_lcm, pickapic, f"model.teacher={tiny_sd}", "train.beta=400")) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # student == reference at step 1
    assert rows[0]["err_policy_w"] == pytest.approx(rows[0]["err_ref_w"], rel=1e-5)
    assert rows[-1]["loss"] != pytest.approx(0.693147, abs=1e-6)  # the adapter moved
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert any("time_emb_proj" in k for k in keys) and any("conv1" in k for k in keys)  # LCM-LoRA set, not attention only


@pytest.mark.fault(input="`train.method=consistency_dpo` with an SD (non-LCM) `model.pretrained`",
                   behaviour="one-line error naming the model and asking for an LCM pipeline; exit 2")
def test_non_lcm_model_is_refused(tmp_path, tiny_sd, pickapic, capsys):
    assert main(_args(tmp_path, tiny_sd, pickapic, f"model.teacher={tiny_sd}")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "latent consistency model" in err[0] and str(tiny_sd) in err[0]


@pytest.mark.fault(input="`train.method=consistency_dpo` with `model.family=sd`",
                   behaviour="one-line config error before anything loads; exit 2")
def test_explicit_non_lcm_family_is_refused(tmp_path, tiny_lcm, tiny_sd, pickapic, capsys):
    assert main(_args(tmp_path, tiny_lcm, pickapic, f"model.teacher={tiny_sd}", "model.family=sd")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.family" in err[0]


@pytest.mark.fault(input="`train.method=consistency_dpo` without `model.teacher`",
                   behaviour="one-line error asking for model.teacher; exit 2")
def test_missing_teacher_is_refused(tmp_path, tiny_lcm, pickapic, capsys):
    assert main(_args(tmp_path, tiny_lcm, pickapic)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.teacher" in err[0]


@pytest.mark.fault(input="`model.teacher` that is itself a latent consistency model",
                   behaviour="one-line error naming model.teacher; exit 2")
def test_lcm_teacher_is_refused(tmp_path, tiny_lcm, pickapic, capsys):
    assert main(_args(tmp_path, tiny_lcm, pickapic, f"model.teacher={tiny_lcm}")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"model.teacher {tiny_lcm} is a lcm pipeline" in err[0] and "plain diffusion model" in err[0]


def test_run_from_a_prepared_cache_starts_at_ln2(tmp_path, tiny_lcm, tiny_sd, pickapic):
    assert main(_args(tmp_path / "run", tiny_lcm, pickapic, f"model.teacher={tiny_sd}", "train.beta=400",
                      f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1")) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(0.693147, abs=1e-5) and row["err_policy_w"] > 0
