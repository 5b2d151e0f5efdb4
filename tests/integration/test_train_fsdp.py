"""FSDP2 through `accelerate launch --config_file configs/accelerate/fsdp.yaml`, on 2 CPU processes (gloo):
the same run as one process with the same global batch, exact resume from its sharded mid-run checkpoint, and
consolidated outputs that stock diffusers loads. docs/scaling.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.cache.prepare import prepare_cache
from diffusion_dpo.cache.store import read_manifest
from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("fsdp_data"), n=8)


def _overrides(model, source, out, *extra) -> list[str]:
    # random flips, crops and caption dropout come from per-pair generators: the same for any process count;
    # gradient accumulation 2 exercises FSDP2's deferred gradient reduction (accelerate's no_sync)
    return [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "data.random_flip=true",
            "data.crop=random", "data.caption_dropout=0.25", "train.max_steps=4", "train.learning_rate=1e-3",
            "train.checkpoint_every=2", "train.lr_scheduler=linear", "train.warmup_steps=1",
            "train.gradient_accumulation=2", "lora.rank=4", "lora.dropout=0.0", "output.report_to=none",
            f"output.dir={out}", *extra]


def launch(config: str, overrides: list[str], port: int, processes: int = 2,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config> -m diffusion_dpo.cli train ...` on CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(processes), "--main_process_port", str(port),
           "-m", "diffusion_dpo.cli", "train", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# Tolerances as in the DDP test (test_train_invariants): the same sums are split differently between processes,
# beta (2000) multiplies error differences and Adam turns rounding-level gradient entries into lr-sized steps.
# Observed on this tiny UNet over 4 steps (2026-11, torch 2.13 CPU): losses within 4.3e-5 (LoRA) and 1.1e-4 (full)
# relative, gradient norms within 3.9e-5 and 7.2e-5; final weights within 1.5e-5 and 3.6e-5 absolute.
def _assert_same_metrics(single: Path, multi: Path) -> None:
    a, b = _metrics(single), _metrics(multi)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and all(r["pairs"] == 4 for r in b)
    for ra, rb in zip(a, b):
        assert rb["implicit_acc"] == ra["implicit_acc"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)


def _assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-4)


@pytest.fixture(scope="module")
def fsdp_lora(tmp_path_factory, tiny_sd, data):
    """(single-process run with batch 2, FSDP2 run of 2 processes with batch 1 each), both LoRA."""
    single = tmp_path_factory.mktemp("lora_single")
    train(load_config(None, _overrides(tiny_sd, data, single, "train.batch_size=2")), progress=False)
    multi = tmp_path_factory.mktemp("lora_fsdp")
    proc = launch("fsdp.yaml", _overrides(tiny_sd, data, multi, "train.batch_size=1"), port=29631)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, multi


def test_fsdp_lora_equals_one_process_and_exports_a_stock_lora(fsdp_lora, tiny_sd):
    single, multi = fsdp_lora
    summary = json.loads((multi / "train_summary.json").read_text())
    assert (summary["engine"], summary["processes"]) == ("fsdp2", 2)  # sharded, not DDP
    shards = multi / "checkpoints" / "checkpoint-2" / "sharded"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (multi / "checkpoints" / "checkpoint-2" / "trainable.safetensors").exists()
    _assert_same_metrics(single, multi)
    wa = load_file(str(single / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(multi / "pytorch_lora_weights.safetensors"))
    _assert_close_weights(wa, wb)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in wb.items())  # trained, not the init
    # the consolidated file loads into a stock pipeline and gives its UNet exactly these adapters
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(str(multi))
    key = next(k for k in wb if "to_q.lora_B" in k)  # "unet.<module>.lora_B.weight"
    module = key[len("unet."):-len(".lora_B.weight")]
    loaded = dict(pipe.unet.named_parameters())[f"{module}.lora_B.default_0.weight"]
    assert torch.equal(loaded.detach(), wb[key])


@pytest.mark.slow  # a 2-process launch each (~1 min on 2 cores); the LoRA equality test is the quick one
def test_fsdp_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(fsdp_lora, tiny_sd, data, tmp_path):
    """The FSDP run's own sharded checkpoint-2, with everything written after it removed (as a run killed after
    step 2 leaves it), resumed by the same command: steps 3-4 and the final adapters are bit-identical."""
    _, uninterrupted = fsdp_lora
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "train_summary.json", "README.md"):
        (resumed / name).unlink()
    proc = launch("fsdp.yaml", _overrides(tiny_sd, data, resumed, "train.batch_size=1"), port=29632)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "train_summary.json").read_text())["steps_this_run"] == 2
    keys = ("step", "loss", "grad_norm", "lr", "implicit_acc", "trained_pairs")
    assert [[r[k] for k in keys] for r in _metrics(resumed)] == [[r[k] for k in keys] for r in _metrics(uninterrupted)]
    wa = load_file(str(uninterrupted / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow  # a 2-process launch each (~1 min on 2 cores); the LoRA equality test is the quick one
def test_fsdp_full_finetuning_equals_one_process_and_exports_a_stock_unet(tmp_path, tiny_sd, data):
    """Full fine-tuning: the policy and its frozen reference are both sharded; the unet/ folder is consolidated."""
    from diffusers import UNet2DConditionModel

    full = ("train.finetune=full", "train.learning_rate=1e-4")
    single = tmp_path / "single"
    train(load_config(None, _overrides(tiny_sd, data, single, "train.batch_size=2", *full)), progress=False)
    multi = tmp_path / "fsdp"
    proc = launch("fsdp.yaml", _overrides(tiny_sd, data, multi, "train.batch_size=1", *full), port=29633)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((multi / "train_summary.json").read_text())["engine"] == "fsdp2"
    assert (multi / "checkpoints" / "checkpoint-2" / "sharded" / ".metadata").is_file()
    _assert_same_metrics(single, multi)
    ua = UNet2DConditionModel.from_pretrained(single / "unet")
    ub = UNet2DConditionModel.from_pretrained(multi / "unet")  # stock diffusers reads the consolidated folder
    start = UNet2DConditionModel.from_pretrained(Path(tiny_sd) / "unet")
    sa, sb, s0 = ua.state_dict(), ub.state_dict(), start.state_dict()
    _assert_close_weights(sa, sb)
    assert max((sb[k] - s0[k]).abs().max().item() for k in s0) > 1e-5  # the export holds trained weights


@pytest.mark.fault(input="an FSDP launch whose accelerate config sets `fsdp_version: 1`",
                   behaviour="exit 2: one line naming fsdp_version and the shipped fsdp.yaml")
def test_fsdp1_config_is_refused_with_one_line(tmp_path, tiny_sd, data, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert main(["train", *_overrides(tiny_sd, data, tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: fsdp_version: 1 in the accelerate config") and "fsdp_version: 2" in err[-1]


@pytest.mark.fault(input="an FSDP launch with `fsdp_activation_checkpointing: true`",
                   behaviour="exit 2: one line pointing to train.gradient_checkpointing")
def test_fsdp_activation_checkpointing_wrapper_is_refused(tmp_path, tiny_sd, data, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert main(["train", *_overrides(tiny_sd, data, tmp_path / "o")]) == 2
    assert "train.gradient_checkpointing=true" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.fault(input="a multi-process launch on a machine without GPUs, without ACCELERATE_USE_CPU",
                   behaviour="exit 2: one line saying to set ACCELERATE_USE_CPU=true (never N separate runs)")
def test_processes_that_would_train_separately_are_refused(tmp_path, tiny_sd, data, monkeypatch, capsys):
    # what accelerate makes of `accelerate launch --num_processes 2` without GPUs: each process thinks it is alone
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert main(["train", *_overrides(tiny_sd, data, tmp_path / "o")]) == 2
    assert "ACCELERATE_USE_CPU=true" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.fault(input="resuming a checkpoint written under FSDP2 without FSDP (or the reverse)",
                   behaviour="exit 2: one line naming the checkpoint and saying to resume with the accelerate config "
                             "that wrote it")
def test_a_sharded_checkpoint_is_not_resumed_by_another_engine(fsdp_lora, tiny_sd, data, tmp_path, capsys):
    _, multi = fsdp_lora
    out = tmp_path / "other_engine"
    shutil.copytree(multi, out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    assert main(["train", *_overrides(tiny_sd, data, out, "train.batch_size=1")]) == 2  # the same command, no launcher
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {out / 'checkpoints' / 'checkpoint-2'} was written under FSDP")
    assert "resume with the accelerate config that wrote it" in last


@pytest.mark.slow  # a 2-process launch each (~1 min on 2 cores); the LoRA equality test is the quick one
def test_fsdp_from_a_prepared_cache_equals_one_process(tmp_path, tiny_sd, data):
    """Each process reads its own share of the cached pairs (memory-mapped shards, opened lazily): the 2-process
    FSDP2 run from the cache equals the single-process run from the same cache."""
    cache = ("data.latent_sampling=mean", "data.crop=center", "data.random_flip=false", "data.cache_dtype=float32",
             f"data.cache_dir={tmp_path / 'cache'}")
    single = tmp_path / "single"
    cfg = load_config(None, _overrides(tiny_sd, data, single, "train.batch_size=2", *cache))
    folder = prepare_cache(cfg, storage_dtype="float32", shard_size=2, progress=False)  # 4 shards of 2 pairs
    assert read_manifest(folder)["num_shards"] == 4
    train(cfg, progress=False)
    multi = tmp_path / "fsdp"
    proc = launch("fsdp.yaml", _overrides(tiny_sd, data, multi, "train.batch_size=1", *cache), port=29634)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the launch read the cache, it did not prepare another
    _assert_same_metrics(single, multi)
    _assert_close_weights(load_file(str(single / "pytorch_lora_weights.safetensors")),
                          load_file(str(multi / "pytorch_lora_weights.safetensors")))


@pytest.mark.slow  # a 2-process launch (~1 min on 2 cores)
@pytest.mark.fault(input="under FSDP, a micro-batch of one process holding only corrupt pairs",
                   behaviour="the process reruns its last good micro-batch weighted 0 (FSDP2 collectives stay in step); "
                             "the pairs are counted as skipped")
def test_fsdp_micro_batch_of_corrupt_pairs_keeps_processes_in_step(tmp_path, tiny_sd):
    # before: the process without pairs skipped the forward and backward in which FSDP2 gathers and reduces, and
    # the other process waited for it forever
    source = write_manifest(tmp_path / "bad", n=8, corrupt=1)
    out = tmp_path / "o"
    proc = launch("fsdp.yaml", _overrides(tiny_sd, source, out, "train.batch_size=1"), port=29635, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["skipped_pairs"] == 2  # the corrupt pair, once in each of the two epochs
    assert rows[-1]["trained_pairs"] == 16 - 2
    assert all(r["loss"] == r["loss"] for r in rows)  # finite: the stand-in micro-batch adds nothing


@pytest.mark.slow  # a 2-process launch each (~1 min on 2 cores); the LoRA equality test is the quick one
def test_fsdp_lora_with_the_recipe_precision_settings(tmp_path, tiny_sd, data):
    """bf16 mixed precision, a bf16 frozen base and gradient checkpointing (the 24 GB LoRA recipes' settings). Before:
    FSDP2 took its dtypes at the first forward, the reference's, where peft had marked the adapters frozen, so it
    reduced the adapters' gradients in bf16 and failed to assign them to the fp32 adapters."""
    out = tmp_path / "o"
    settings = ("train.batch_size=1", "train.max_steps=2", "train.mixed_precision=bf16", "model.frozen_dtype=bfloat16",
                "train.gradient_checkpointing=true")
    proc = launch("fsdp.yaml", _overrides(tiny_sd, data, out, *settings), port=29636)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {v.dtype for v in lora.values()} == {torch.float32}  # fp32 master adapters, exported as such
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())
