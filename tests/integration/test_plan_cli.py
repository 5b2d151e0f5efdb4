"""`diffusion-dpo plan` end to end on a tiny pipeline: the estimate against real training steps, the table, the
JSON, and the bad inputs."""

from __future__ import annotations

import json

import pytest

from diffusion_dpo.cli import main


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from diffusion_dpo.data.synthetic import write_pickapic_parquet

    path = tmp_path_factory.mktemp("plan") / "pairs.parquet"
    write_pickapic_parquet(path, n=8, seed=0, size=(36, 40))
    return path


def _args(model, pairs, *extra):
    return ["plan", f"model.pretrained={model}", f"data.source={pairs}", "data.resolution=32", *extra]


@pytest.mark.parametrize("finetune,checkpointing", [("lora", "true"), ("full", "false")])
def test_estimate_is_within_15_percent_of_the_measured_peak(tiny_sd, pairs, finetune, checkpointing, capsys):
    """The issue's check: the planner's peak against 3 real training steps of the same config on this CPU (the
    profiler's count of the CPU allocator, plus what was live before the steps). LoRA (with gradient
    checkpointing): the base frozen, no reference copy; full: fp32 weights, gradients, AdamW state and a frozen
    copy. Both encode on the fly, so the VAE and text encoder are in both counts. scripts/plan_error_table.py
    measured 1.002 and 1.002 for these two (LoRA with checkpointing was 1.22 while the FLOPs were counted inside the
    tracked step)."""
    assert main(_args(tiny_sd, pairs, f"train.finetune={finetune}", "train.batch_size=2",
                      f"train.gradient_checkpointing={checkpointing}", "--measure", "--json", "-")) == 0
    plan = json.loads(capsys.readouterr().out)
    ratio = plan["measured"]["estimate_over_measured"]
    assert 0.85 <= ratio <= 1.15, plan["measured"]
    parts = plan["single_device"]["at_peak"]
    assert parts["encoders"] > 0 and parts["activations"] > 0
    if finetune == "full":  # the frozen copy is the policy's size; AdamW keeps two moments of every weight and a
        assert parts["reference"] == parts["policy_trainable"]  # 4-byte step count per parameter tensor
        n_tensors = (parts["optimizer"] - 2 * parts["policy_trainable"]) / 4
        assert n_tensors == int(n_tensors) and 100 < n_tensors < 1000
    else:
        assert parts["reference"] == 0 and parts["policy_frozen"] > 10 * parts["policy_trainable"]


def test_table_engines_and_sharding(tiny_sd, pairs, capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(_args(tiny_sd, pairs, "train.finetune=full", "--world-size", "4", "--device-memory", "1GiB",
                      "--json", str(out))) == 0
    text = capsys.readouterr().out
    for line in ("one device, no sharding", "trained weights", "reference copy", "peak", "TFLOP per device",
                 "engines on 4 device(s) of 1.00 GiB", "recommended: none fits"):
        assert line in text  # 1 GiB minus the 1 GiB context reserve: nothing fits
    plan = json.loads(out.read_text())
    rows = {r["engine"]: r["bytes_per_device"] for r in plan["engines"]}
    # sharding the weights, gradients and optimizer 4 ways saves more than ZeRO-2's (gradients and optimizer) and
    # offloading saves more than sharding; DDP holds one more copy of the gradients than anything else
    assert rows["ddp"] > rows["zero2"] > rows["zero3"] >= rows["fsdp"] > rows["fsdp+offload"]
    assert rows["zero2+offload"] < rows["zero2"]
    assert plan["flops"]["per_optimizer_step"] == pytest.approx(4 * plan["flops"]["per_device_step"])
    assert not any(r["fits"] for r in plan["engines"]) and plan["recommended"] is None


@pytest.mark.fault(input="`plan` with neither model.pretrained nor --arch", behaviour="exit 2: asks for a folder or --arch")
def test_plan_without_a_model(capsys):
    assert main(["plan"]) == 2
    assert "model.pretrained" in capsys.readouterr().err


@pytest.mark.fault(input="`plan --arch sdxl --measure` (published configs have no weights to run)",
                   behaviour="exit 2: drop --arch or --measure")
def test_measure_needs_the_configs_own_model(capsys):
    assert main(["plan", "--arch", "sdxl", "--measure"]) == 2
    assert "--measure" in capsys.readouterr().err


@pytest.mark.fault(input="`plan` on a folder without model_index.json",
                   behaviour="exit 2: names the folder; suggests a pipeline folder or --arch")
def test_plan_on_a_folder_that_is_no_pipeline(tmp_path, capsys):
    assert main(["plan", f"model.pretrained={tmp_path}"]) == 2
    assert "model_index.json" in capsys.readouterr().err


@pytest.mark.fault(input="`plan --world-size 0`", behaviour="exit 2: --world-size must be >= 1")
def test_world_size_must_be_positive(capsys):
    assert main(["plan", "--arch", "sd15", "--world-size", "0"]) == 2
    assert "--world-size" in capsys.readouterr().err


@pytest.mark.fault(input="`plan --measure` on a config whose training cannot run (data.source missing)",
                   behaviour="exit 2: the training error's last line; drop --measure or fix the config")
def test_measure_of_a_config_that_cannot_train(tiny_sd, tmp_path, capsys):
    assert main(_args(tiny_sd, tmp_path / "missing.parquet", "--measure")) == 2
    err = capsys.readouterr().err
    assert "plan --measure: the training steps failed" in err and "missing.parquet" in err
