"""Checkpoint folders: pruning keeps the newest, a re-save never leaves no checkpoint, a corrupt one is named
and skipped, a checkpoint of other LoRA shapes is refused by setting name, torn metrics lines are dropped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from diffusion_dpo.config import RunConfig
from diffusion_dpo.errors import CheckpointError, ConfigError
from diffusion_dpo.train import checkpoint as ckpt


def _parts(out_features: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, out_features)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save(root: Path, step: int, keep, cfg=None, model_parts=None):
    model, opt, sched = model_parts or _parts(seed=step)
    return ckpt.save(root, step, model, opt, sched, cfg or RunConfig(), {"trained_pairs": step}, keep)


def _steps(root: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(root)]


def test_pruning_keeps_the_newest_checkpoints(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == [40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-40", "checkpoint-50"]  # no temp folders left
    assert ckpt.read_latest(tmp_path).state["step"] == 50


def test_resaving_the_only_checkpoint_never_leaves_none(tmp_path, monkeypatch):
    """limit 1, the same step written again, killed just before the new folder is renamed into place."""
    first = _parts(seed=1)
    _save(tmp_path, 7, keep=1, model_parts=first)
    rename = Path.rename

    def killed_before_final_rename(self, target):
        if self.name.startswith(".tmp-"):
            raise KeyboardInterrupt  # the process dies here
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_final_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 7, keep=1)
    monkeypatch.setattr(Path, "rename", rename)
    back = ckpt.read_latest(tmp_path)  # the old checkpoint-7, whole
    assert back.path.name == "checkpoint-7"
    torch.testing.assert_close(back.weights["weight"], first[0].weight.detach(), rtol=0, atol=0)
    # a completed re-save replaces it and leaves nothing else behind
    second = _parts(seed=2)
    _save(tmp_path, 7, keep=1, model_parts=second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    torch.testing.assert_close(ckpt.read_latest(tmp_path).weights["weight"], second[0].weight.detach(), rtol=0, atol=0)


@pytest.mark.fault(input="corrupt latest checkpoint (truncated weights file)",
                   behaviour="warning naming the file; resume falls back to the previous checkpoint")
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    _save(tmp_path, 1, keep=None)
    _save(tmp_path, 2, keep=None)
    bad = tmp_path / "checkpoint-2" / "trainable.safetensors"
    bad.write_bytes(bad.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        found = ckpt.read_latest(tmp_path)
    assert found.path.name == "checkpoint-1" and found.state["step"] == 1
    assert str(bad) in caplog.text


def test_after_a_fallback_the_corrupt_newer_checkpoint_never_outlives_the_good_ones(tmp_path):
    _save(tmp_path, 2, keep=None)
    _save(tmp_path, 4, keep=None)
    (tmp_path / "checkpoint-4" / "rng.pt").write_bytes(b"")  # corrupt
    assert ckpt.read_latest(tmp_path).path.name == "checkpoint-2"  # the run resumes from 2 ...
    _save(tmp_path, 3, keep=1)  # ... and its next checkpoint must be what remains, not the corrupt 4
    assert _steps(tmp_path) == [3]


@pytest.mark.fault(input="every checkpoint in output.dir corrupt",
                   behaviour="`CheckpointError` (exit 2) naming the unreadable file; delete it or `train.resume=never`")
def test_no_readable_checkpoint_is_an_error_naming_the_file(tmp_path):
    _save(tmp_path, 3, keep=None)
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"checkpoint-3/optimizer\.pt cannot be read.*train\.resume=never"):
        ckpt.read_latest(tmp_path)


def test_checkpoint_of_other_lora_shapes_is_refused_naming_the_setting(tmp_path):
    written = RunConfig()
    written.lora.rank = 3
    _save(tmp_path, 1, keep=None, cfg=written, model_parts=_parts(out_features=3))
    now = RunConfig()
    now.lora.rank = 4
    model, opt, sched = _parts(out_features=4)
    before = model.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"bias is \(3,\) there, \(4,\) here.*lora\.rank=3 there, 4 here"):
        ckpt.apply(ckpt.read_latest(tmp_path), now, model, opt, sched)
    assert torch.equal(model.weight, before)  # nothing half-applied


def test_truncate_metrics_drops_a_torn_last_line_and_lines_past_the_checkpoint(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + "\n" + '{"step": 4, "lo')  # disk full in the middle of line 4
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        ckpt.truncate_metrics(path, 2)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert "line 4" in caplog.text
