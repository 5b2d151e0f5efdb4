"""DeepSpeed ZeRO through `accelerate launch --config_file configs/accelerate/zero2.yaml | zero3.yaml`, on 2 CPU
processes: DeepSpeed's CPU accelerator runs ZeRO over the gloo group accelerate sets up (train.engine). The same run
as one process with the same global batch, exact resume from its own mid-run checkpoint, consolidated outputs.
Skipped where deepspeed is not installed (it is an extra: pip install 'diffusion-dpo[deepspeed]'); docs/scaling.md."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.train.trainer import train
from test_train_fsdp import CONFIGS, ROOT, _assert_close_weights, _assert_same_metrics, _metrics, _overrides, launch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install 'diffusion-dpo[deepspeed]')")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffusion_dpo.data.synthetic import write_manifest

    return write_manifest(tmp_path_factory.mktemp("ds_data"), n=8)


@pytest.fixture(scope="module")
def zero2_lora(tmp_path_factory, tiny_sd, data):
    """(single-process run with batch 2, ZeRO-2 run of 2 processes with batch 1 each), both LoRA, accumulation 2."""
    single = tmp_path_factory.mktemp("lora_single")
    train(load_config(None, _overrides(tiny_sd, data, single, "train.batch_size=2")), progress=False)
    multi = tmp_path_factory.mktemp("lora_zero2")
    proc = launch("zero2.yaml", _overrides(tiny_sd, data, multi, "train.batch_size=1"), port=29651)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, multi


def test_zero2_lora_equals_one_process(zero2_lora):
    """DeepSpeed owns accumulation (its boundary from accelerate's accumulate), clipping (train.max_grad_norm=1 as
    its gradient_clipping) and the step: the losses, gradient norms and adapters are the single process's. The
    tolerances are the FSDP test's (the same sums split differently between processes)."""
    single, multi = zero2_lora
    summary = json.loads((multi / "train_summary.json").read_text())
    assert (summary["engine"], summary["processes"]) == ("deepspeed-zero2", 2)
    ckpt = multi / "checkpoints" / "checkpoint-2"
    assert (ckpt / "deepspeed").is_dir() and not (ckpt / "trainable.safetensors").exists()
    # one optimizer shard per process; the model file holds the adapters only (exclude_frozen_parameters)
    assert sorted(p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    _assert_same_metrics(single, multi)
    wa = load_file(str(single / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(multi / "pytorch_lora_weights.safetensors"))
    _assert_close_weights(wa, wb)
    assert {v.dtype for v in wb.values()} == {torch.float32}
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in wb.items())  # trained, not the init


@pytest.mark.slow
def test_zero2_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(zero2_lora, tiny_sd, data, tmp_path):
    """The ZeRO-2 run's own checkpoint-2 (everything after it removed, as a kill after step 2 leaves it), resumed by
    the same command: weights, optimizer partitions, schedule, RNG and data position restored, steps 3-4 identical."""
    _, uninterrupted = zero2_lora
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "train_summary.json", "README.md"):
        (resumed / name).unlink()
    proc = launch("zero2.yaml", _overrides(tiny_sd, data, resumed, "train.batch_size=1"), port=29652)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "train_summary.json").read_text())["steps_this_run"] == 2
    keys = ("step", "loss", "grad_norm", "lr", "implicit_acc", "trained_pairs")
    assert [[r[k] for k in keys] for r in _metrics(resumed)] == [[r[k] for k in keys] for r in _metrics(uninterrupted)]
    wa = load_file(str(uninterrupted / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.fault(input="resuming a checkpoint written under DeepSpeed without it",
                   behaviour="exit 2: one line naming the checkpoint and saying to resume with the accelerate config "
                             "that wrote it")
def test_a_deepspeed_checkpoint_is_not_resumed_without_deepspeed(zero2_lora, tiny_sd, data, tmp_path, capsys):
    _, multi = zero2_lora
    out = tmp_path / "other_engine"
    shutil.copytree(multi, out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    assert main(["train", *_overrides(tiny_sd, data, out, "train.batch_size=1")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {out / 'checkpoints' / 'checkpoint-2'} was written under DeepSpeed")
    assert "resume with the accelerate config that wrote it" in last


@pytest.mark.slow
def test_zero3_full_finetuning_equals_one_process_and_exports_a_stock_unet(tmp_path, tiny_sd, data):
    """ZeRO-3 full fine-tuning: the policy's parameters, gradients and Adam state partitioned over the processes,
    the frozen reference in an engine of its own (partitioned the same way, no optimizer); the unet/ folder
    gathered from the partitions loads in stock diffusers."""
    from diffusers import UNet2DConditionModel

    full = ("train.finetune=full", "train.learning_rate=1e-4")
    single = tmp_path / "single"
    train(load_config(None, _overrides(tiny_sd, data, single, "train.batch_size=2", *full)), progress=False)
    multi = tmp_path / "zero3"
    proc = launch("zero3.yaml", _overrides(tiny_sd, data, multi, "train.batch_size=1", *full), port=29653)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((multi / "train_summary.json").read_text())["engine"] == "deepspeed-zero3"
    _assert_same_metrics(single, multi)
    ua = UNet2DConditionModel.from_pretrained(single / "unet")
    ub = UNet2DConditionModel.from_pretrained(multi / "unet")
    start = UNet2DConditionModel.from_pretrained(Path(tiny_sd) / "unet")
    sa, sb, s0 = ua.state_dict(), ub.state_dict(), start.state_dict()
    _assert_close_weights(sa, sb)
    assert max((sb[k] - s0[k]).abs().max().item() for k in s0) > 1e-5  # the export holds trained weights


# process 0's loss turns infinite at its 3rd micro-batch (step 2), its gradient stays finite; process 1's is finite
NAN_ON_PROCESS_0 = """
import os, sys
from diffusion_dpo.train import trainer
real, calls = trainer.preference_step, [0]
def nan_once(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "0":
        out.loss = out.loss + float("inf")
    return out
trainer.preference_step = nan_once
from diffusion_dpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.fault(input="under DeepSpeed, a non-finite loss (with finite gradients) on one process with "
                         "`train.on_nonfinite=skip`",
                   behaviour="every process skips that step (DeepSpeed's own overflow check on the NaN gradients), "
                             "counted in skipped_steps; the LR schedule does not advance")
def test_zero2_skips_a_nonfinite_step_on_every_process(tmp_path, tiny_sd, data):
    """DeepSpeed steps inside the last backward, before the trainer sees the metrics: the infinite loss must still
    skip the update on both processes, as train.on_nonfinite=skip does without DeepSpeed. Before: DeepSpeed applied
    the step (its gradients were finite) while the trainer counted it as skipped."""
    script = tmp_path / "nan_once.py"
    script.write_text(NAN_ON_PROCESS_0)
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero2.yaml"),
           "--num_processes", "2", "--main_process_port", "29654", str(script), "train",
           *_overrides(tiny_sd, data, out, "train.batch_size=1", "train.on_nonfinite=skip", "train.checkpoint_every=1",
                         "train.checkpoints_total_limit=4")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert [r["trained_pairs"] for r in rows] == [4, 4, 8, 12]
    assert rows[1]["lr"] == rows[0]["lr"] != rows[2]["lr"]  # the skipped update did not advance the schedule
    def adapters(step: int) -> dict[str, torch.Tensor]:  # the engine's checkpoint: the trainable tensors only
        path = out / "checkpoints" / f"checkpoint-{step}" / "deepspeed" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["module"]

    before, skipped, after = adapters(1), adapters(2), adapters(3)
    assert before and all(torch.equal(before[k], skipped[k]) for k in before)  # step 2 changed nothing
    assert not all(torch.equal(skipped[k], after[k]) for k in skipped)  # step 3 trained
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in lora.values())


@pytest.mark.slow
def test_zero2_lora_with_the_recipe_precision_settings(tmp_path, tiny_sd, data):
    """bf16 (DeepSpeed's bf16 mode: the network cast to bf16, fp32 master weights in the optimizer, the forward under
    autocast for the fp32 inputs), a bf16 frozen base and gradient checkpointing: the exported adapters are the fp32
    masters, trained."""
    out = tmp_path / "o"
    settings = ("train.batch_size=1", "train.max_steps=2", "train.mixed_precision=bf16", "model.frozen_dtype=bfloat16",
                "train.gradient_checkpointing=true")
    proc = launch("zero2.yaml", _overrides(tiny_sd, data, out, *settings), port=29655)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == 0 for r in rows)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {v.dtype for v in lora.values()} == {torch.float32}
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())


@pytest.mark.slow
@pytest.mark.fault(input="under DeepSpeed, a micro-batch of one process holding only corrupt pairs",
                   behaviour="the process reruns its last good micro-batch weighted 0 (ZeRO's collectives stay in "
                             "step); the pairs are counted as skipped")
def test_zero2_micro_batch_of_corrupt_pairs_keeps_processes_in_step(tmp_path, tiny_sd):
    from diffusion_dpo.data.synthetic import write_manifest

    source = write_manifest(tmp_path / "bad", n=8, corrupt=1)
    out = tmp_path / "o"
    proc = launch("zero2.yaml", _overrides(tiny_sd, source, out, "train.batch_size=1"), port=29656, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["skipped_pairs"] == 2  # the corrupt pair, once in each of the two epochs
    assert rows[-1]["trained_pairs"] == 16 - 2
    assert all(r["loss"] == r["loss"] for r in rows)  # finite: the stand-in micro-batch adds nothing
