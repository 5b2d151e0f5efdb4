"""output.dir ownership without models: the lock, "is this one of our runs", which settings a resume may change."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from diffusion_dpo.config import load_config, to_dict
from diffusion_dpo.train import run_dir
from diffusion_dpo.train.run_dir import LOCK_FILE, RunDirError, acquire_lock, check_ours, resume_differences

HOLD = ("import sys; from pathlib import Path; from diffusion_dpo.train.run_dir import acquire_lock; "
        "acquire_lock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")


def _hold_lock(folder):
    """A second process that locks `folder` and keeps it until killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    proc = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another training run \(pid {proc.pid} on host "):
            acquire_lock(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays, naming a dead pid
        proc.wait()
    assert f'"pid": {proc.pid}' in (tmp_path / LOCK_FILE).read_text()
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        lock = acquire_lock(tmp_path)
    assert f"stale lock {tmp_path / LOCK_FILE} left by pid {proc.pid}" in caplog.text
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()  # released: the folder is as it was


def test_lock_is_reentrant_within_a_process(tmp_path):
    """A second Trainer in the same process (iterate, a notebook) shares the lock; the last release drops it."""
    first, second = acquire_lock(tmp_path), acquire_lock(tmp_path)
    assert first is second
    first.release()
    assert (tmp_path / LOCK_FILE).exists()
    proc = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], input="", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr  # still held against other processes
    second.release()
    assert not (tmp_path / LOCK_FILE).exists() and (tmp_path / LOCK_FILE).resolve() not in run_dir._HELD


def test_what_counts_as_one_of_our_runs(tmp_path):
    check_ours(tmp_path / "missing")  # a new folder
    (tmp_path / ".ipynb_checkpoints").mkdir()
    check_ours(tmp_path)  # hidden entries are never ours to overwrite, so they do not matter
    (tmp_path / "README.md").write_text("my notes")
    with pytest.raises(RunDirError, match=r"is not empty \(README.md\) and holds no diffusion-dpo training run"):
        check_ours(tmp_path)
    (tmp_path / "model_spec.json").write_text("{}")  # a run written before train_run.json existed
    check_ours(tmp_path)


def _as_trained(overrides: list[str]):
    """A config as Trainer.setup compares it: loaded, then an SD pipeline's defaults filled in."""
    from diffusion_dpo.models.families import SDFamily

    return load_config(None, overrides).with_network_defaults(SDFamily.lora_targets)


def test_resume_differences_name_result_keys_only():
    base = _as_trained(["train.lr_scheduler=constant_with_warmup"])
    saved = to_dict(base)
    free = _as_trained(["train.max_steps=9000", "train.checkpoint_every=7", "train.checkpoints_total_limit=1",
                        "train.log_every=5", "data.num_workers=3", "output.report_to=none", "output.dir=elsewhere",
                        "train.gradient_checkpointing=true", "train.on_nonfinite=skip", "lora.export_kohya=true"])
    assert resume_differences(saved, free) == {}
    # a run written before lora.target_modules defaulted to the family's set recorded the UNet list explicitly
    explicit = to_dict(load_config(None, ["train.lr_scheduler=constant_with_warmup",
                                          "lora.target_modules=[to_q,to_k,to_v,to_out.0]"]))
    assert resume_differences(explicit, base) == {}
    changed = _as_trained(["train.beta=5000", "train.learning_rate=3e-5", "data.source=other",
                           "train.method=sft", "lora.target_modules=[to_q]"])
    assert resume_differences(saved, changed) == {
        "data.source": ("", "other"), "lora.target_modules": (["to_q", "to_k", "to_v", "to_out.0"], ["to_q"]),
        "train.beta": (2000.0, 5000.0), "train.learning_rate": (1e-5, 3e-5), "train.method": ("dpo", "sft")}
    # a decaying schedule is stretched by max_steps, so there it determines the result
    linear = to_dict(_as_trained(["train.lr_scheduler=linear"]))
    longer = _as_trained(["train.lr_scheduler=linear", "train.max_steps=4000"])
    assert resume_differences(linear, longer) == {"train.max_steps": (2000, 4000)}
    # a key the checkpoint's (older) config lacks counts as its default
    del saved["train"]["lean_autograd"], saved["data"]["latent_sampling"]
    assert resume_differences(saved, base) == {}
    assert resume_differences(saved, _as_trained(["data.latent_sampling=mean"])) == {
        "data.latent_sampling": ("sample", "mean")}


def test_a_claimed_folder_is_released_when_its_run_dir_is_collected(tmp_path):
    """A Trainer that is set up but never trains (bench, tests) must not keep its folder locked."""
    import gc

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    claimed = run_dir.RunDir.claim(cfg, is_main=True)
    assert (tmp_path / LOCK_FILE).exists() and (tmp_path / run_dir.RUN_FILE).is_file()
    del claimed
    gc.collect()
    assert not (tmp_path / LOCK_FILE).exists()
    run_dir.RunDir.claim(cfg, is_main=True).release()  # claimable again, and ours now
