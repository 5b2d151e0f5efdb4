"""Training invariants: resumed == uninterrupted, batch 2 x accumulation 1 == batch 1 x accumulation 2,
2 processes (gloo) == 1 process with the same global batch, non-finite losses never pass silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.errors import NonFiniteLossError, TrainingInterrupted
from diffusion_dpo.train import trainer as trainer_mod
from diffusion_dpo.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("inv"), n=8)


def _overrides(model, source, out, *extra) -> list[str]:
    return [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "data.random_flip=true",
            "data.crop=random", "data.caption_dropout=0.25", "train.max_steps=4", "train.learning_rate=1e-3",
            "train.checkpoint_every=2", "train.lr_scheduler=linear", "train.warmup_steps=1", "lora.rank=4",
            "lora.dropout=0.0", "output.report_to=none", f"output.dir={out}", *extra]


def _cfg(model, source, out, *extra):
    return load_config(None, _overrides(model, source, out, *extra))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


class Crash(Exception):
    pass


# Resume under gradient accumulation (the data position is step x accumulation micro-batches) and LoRA
# dropout (the only user of the global RNG, restored from the checkpoint after the loader's iterator exists).
RESUME = ("train.batch_size=1", "train.gradient_accumulation=2", "lora.dropout=0.1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_sd, data):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(_cfg(tiny_sd, data, out, *RESUME))
    return out


def _assert_same_run(a: Path, b: Path):
    """Bit-identical: same losses, learning rates and final weights."""
    ra, rb = _metrics(a), _metrics(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in rb] == [(r["loss"], r["grad_norm"], r["lr"]) for r in ra]
    wa, wb = _lora(a), _lora(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wb[k], wa[k]), k


@pytest.mark.fault(input="`metrics.jsonl` whose last line was cut short (kill, full disk)",
                   behaviour="resume drops the torn line (warning) and continues exactly")
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_sd, data, uninterrupted, train_until_checkpoint):
    resumed = tmp_path / "resumed"
    train_until_checkpoint(_cfg(tiny_sd, data, resumed, *RESUME), step=2)
    assert [r["step"] for r in _metrics(resumed)] == [1, 2]
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # killed while writing step 3's line
    summary = train(_cfg(tiny_sd, data, resumed, *RESUME))
    assert summary["steps_this_run"] == 2  # continued from checkpoint-2, did not start over
    _assert_same_run(uninterrupted, resumed)


@pytest.mark.fault(input="SIGTERM (or Ctrl-C) during training",
                   behaviour="checkpoint at the end of the step, exit 2: one line naming it; a rerun resumes exactly")
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path, tiny_sd, data, uninterrupted, monkeypatch,
                                                                  capsys):
    from diffusion_dpo.cli import main

    out = tmp_path / "stopped"
    original = Trainer.micro_step

    def terminated_during_step_3(self, raw):
        if self.step == 2 and self.stop.received is None:  # once: a second signal means "stop now"
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, raw)

    monkeypatch.setattr(Trainer, "micro_step", terminated_during_step_3)
    assert main(["train", *_overrides(tiny_sd, data, out, *RESUME)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: stopped by SIGTERM after step 3; rerun the same command to resume "
                                            f"from {out / 'checkpoints' / 'checkpoint-3'}")
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]  # step 3 finished before stopping
    monkeypatch.setattr(Trainer, "micro_step", original)
    assert train(_cfg(tiny_sd, data, out, *RESUME))["steps_this_run"] == 1
    _assert_same_run(uninterrupted, out)


def test_second_ctrl_c_stops_at_once_naming_the_last_checkpoint(tmp_path, tiny_sd, data, monkeypatch):
    original = Trainer.micro_step

    def ctrl_c_twice_in_step_3(self, raw):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # stop after this step...
            os.kill(os.getpid(), signal.SIGINT)  # ...no, now
        return original(self, raw)

    monkeypatch.setattr(Trainer, "micro_step", ctrl_c_twice_in_step_3)
    out = tmp_path / "o"
    with pytest.raises(TrainingInterrupted, match=f"during step 3; .* resume from {out / 'checkpoints' / 'checkpoint-2'}"):
        train(_cfg(tiny_sd, data, out, "train.batch_size=2"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def _accumulated_grads(model, source, out, batch_size, accumulation):
    cfg = _cfg(model, source, out, f"train.batch_size={batch_size}", f"train.gradient_accumulation={accumulation}")
    t = Trainer(cfg).setup()
    batches = iter(t.loader)
    for _ in range(accumulation):
        loss, _, _ = t.micro_step(next(batches))
        t.accelerator.backward(loss / accumulation)
    return {n: p.grad.clone() for n, p in t.unet.named_parameters() if p.requires_grad}


def test_batch2_equals_batch1_with_accumulation2(tmp_path, tiny_sd, data):
    # the invariant itself: the accumulated gradient of one optimizer step is the same
    g2 = _accumulated_grads(tiny_sd, data, tmp_path / "g2", 2, 1)
    g1 = _accumulated_grads(tiny_sd, data, tmp_path / "g1", 1, 2)
    assert max(g.abs().max().item() for g in g2.values()) > 1e-2  # a real gradient, not zeros
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-5)
    # whole runs: beta (2000) multiplies error differences, and Adam turns rounding-level gradient entries
    # into lr-sized steps, so the losses agree to about 1e-3 rather than to float precision
    train(_cfg(tiny_sd, data, tmp_path / "b2", "train.batch_size=2", "train.gradient_accumulation=1"))
    train(_cfg(tiny_sd, data, tmp_path / "b1", "train.batch_size=1", "train.gradient_accumulation=2"))
    a, b = _metrics(tmp_path / "b2"), _metrics(tmp_path / "b1")
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)
        assert rb["implicit_acc"] == ra["implicit_acc"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
        assert rb["pairs"] == ra["pairs"] == 2
    wa, wb = _lora(tmp_path / "b2"), _lora(tmp_path / "b1")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=1e-4)


def test_two_processes_equal_one_process(tmp_path, tiny_sd, data):
    """torchrun with 2 CPU processes (gloo DDP), batch 1 each == 1 process with batch 2."""
    single = tmp_path / "single"
    train(_cfg(tiny_sd, data, single, "train.batch_size=2"))
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    overrides = [f"model.pretrained={tiny_sd}", f"data.source={data}", "data.resolution=32", "data.random_flip=true",
                 "data.crop=random", "data.caption_dropout=0.25", "train.max_steps=4", "train.learning_rate=1e-3",
                 "train.checkpoint_every=2", "train.lr_scheduler=linear", "train.warmup_steps=1", "lora.rank=4",
                 "output.report_to=none", f"output.dir={multi}", "train.batch_size=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "diffusion_dpo.cli", "train", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(single), _metrics(multi)
    assert len(b) == 4 and all(r["pairs"] == 2 for r in b)
    for ra, rb in zip(a, b):  # tolerances as in the accumulation test
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)
        assert rb["implicit_acc"] == ra["implicit_acc"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    wa, wb = _lora(single), _lora(multi)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=1e-4)


def test_nonfinite_loss_stops_or_is_skipped_and_counted(tmp_path, tiny_sd, data, monkeypatch):
    real = trainer_mod.preference_step
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "preference_step", nan_on_second_call)
    with pytest.raises(NonFiniteLossError, match="on_nonfinite=skip"):
        train(_cfg(tiny_sd, data, tmp_path / "stop", "train.batch_size=2"))
    calls["n"] = 0
    summary = train(_cfg(tiny_sd, data, tmp_path / "skip", "train.batch_size=2", "train.on_nonfinite=skip"))
    assert summary["skipped_steps"] == 1
    rows = _metrics(tmp_path / "skip")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]


def test_training_from_cache_equals_on_the_fly(tmp_path, tiny_sd, data):
    """data.cache_dir: prepared once, then no VAE or text encoder in memory; same losses (mean mode, fp32 cache)."""
    from diffusion_dpo.train.batch import CachedEncoder

    common = ["train.batch_size=2", "data.latent_sampling=mean", "data.crop=center"]
    cfg = _cfg(tiny_sd, data, tmp_path / "cached", *common, f"data.cache_dir={tmp_path / 'cache'}",
               "data.cache_dtype=float32", "data.random_flip=false")
    t = Trainer(cfg).setup()
    assert isinstance(t.batch_encoder, CachedEncoder)  # reads tensors: holds no VAE, no text encoder
    t.train()
    fly_cfg = _cfg(tiny_sd, data, tmp_path / "fly2", *common, "data.random_flip=false")
    train(fly_cfg)
    a, b = _metrics(tmp_path / "fly2"), _metrics(tmp_path / "cached")
    for ra, rb in zip(a, b):  # the reference sees identical inputs: errors agree to float precision
        assert rb["err_ref_w"] == pytest.approx(ra["err_ref_w"], rel=1e-5)
        assert rb["err_ref_l"] == pytest.approx(ra["err_ref_l"], rel=1e-5)
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-5)  # after the first (warm-up, lr 0) step
    for ra, rb in zip(a, b):  # later steps: beta x Adam amplify rounding (see the accumulation test)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one keyed folder, reused by a second run
    train(_cfg(tiny_sd, data, tmp_path / "cached_again", *common, f"data.cache_dir={tmp_path / 'cache'}",
               "data.cache_dtype=float32", "data.random_flip=false"))
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_lean_autograd_changes_nothing_but_saved_activations(tmp_path, tiny_sd, data):
    """train.lean_autograd (default on) must give the same run, bit for bit, as plain autograd."""
    from diffusion_dpo.models import lean_autograd

    cfg = _cfg(tiny_sd, data, tmp_path / "probe", "train.batch_size=2")
    unet = Trainer(cfg).setup().unet
    assert any(getattr(m, lean_autograd._PATCHED, None) == "conv2d" for m in unet.modules())
    train(_cfg(tiny_sd, data, tmp_path / "lean", "train.batch_size=2"))
    train(_cfg(tiny_sd, data, tmp_path / "plain", "train.batch_size=2", "train.lean_autograd=false"))
    a, b = _metrics(tmp_path / "lean"), _metrics(tmp_path / "plain")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["grad_norm"], ra["implicit_acc"]) == (rb["loss"], rb["grad_norm"], rb["implicit_acc"])
    wa, wb = _lora(tmp_path / "lean"), _lora(tmp_path / "plain")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture
def fp16_accelerator():
    """An fp16 Accelerator with torch's CPU GradScaler. accelerate builds a scaler only on GPUs; with this one
    acc.backward scales the loss, clip_grad_norm_ unscales, the optimizer wrapper runs scaler.step + update,
    and acc.autocast() is torch.autocast("cpu", float16): the fp16 code path of a GPU run, on a CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make():
        AcceleratorState._reset_state(True)
        acc = Accelerator(mixed_precision="fp16", cpu=True)
        # 2^8, not the default 2^16: this tiny UNet's fp16 gradients overflow at 2^16 by themselves, and the test
        # wants exactly one overflow, where it puts it
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), True
        return acc

    yield make
    AcceleratorState._reset_state(True)  # later tests build their own (fp32) accelerator


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_fp16_overflow_skips_the_step_lowers_the_scale_and_continues(tmp_path, tiny_sd, data, fp16_accelerator,
                                                                     on_nonfinite):
    cfg = _cfg(tiny_sd, data, tmp_path, "train.batch_size=2", "train.mixed_precision=fp16", "train.checkpoint_every=1",
               "train.max_steps=3", f"train.on_nonfinite={on_nonfinite}")
    t = Trainer(cfg, accelerator=fp16_accelerator(), progress=False).setup()
    assert t.accelerator.scaler.get_scale() == 2.0 ** 8
    lora_b = next(p for n, p in t.unet.named_parameters() if "lora_B" in n)
    # step 2's scaled gradient overflows (inf), as fp16 gradients do when the loss scale is too high
    lora_b.register_hook(lambda g: torch.full_like(g, float("inf")) if t.step == 1 else g)
    summary = t.train()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the run went on
    assert [r["overflow_steps"] for r in rows] == [0, 1, 1] and summary["overflow_steps"] == 1
    assert [r["loss_scale"] for r in rows] == [2.0 ** 8, 2.0 ** 7, 2.0 ** 7]  # halved once
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0]  # an overflow is not a non-finite loss
    assert [r["trained_pairs"] for r in rows] == [2, 2, 4]
    assert rows[1]["lr"] == rows[0]["lr"] != rows[2]["lr"]  # the skipped update did not advance the schedule
    ck = [load_file(str(tmp_path / "checkpoints" / f"checkpoint-{s}" / "trainable.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(ck[0][k], ck[1][k]) for k in ck[0])  # step 2 changed nothing
    assert not all(torch.equal(ck[1][k], ck[2][k]) for k in ck[1])  # step 3 did
    # the loss scale is part of the checkpoint: a resumed run continues with 2^7, not 2^8
    again = Trainer(cfg, accelerator=fp16_accelerator(), progress=False).setup()
    assert again.step == 3 and again.accelerator.scaler.get_scale() == 2.0 ** 7
