"""Resumable checkpoints: trainable weights, optimizer, LR schedule, fp16 loss scale, RNG states, step, config.

Layout: <output>/checkpoints/checkpoint-<step>/ with trainable.safetensors, optimizer.pt,
scheduler.pt, rng.pt, trainer_state.json, config.yaml and, under fp16 loss scaling, scaler.pt.
A checkpoint is written into a temporary folder and renamed, so a crash never leaves a half-written
one that resume would pick up; an existing folder of the same step is swapped out only after its
replacement is complete, and no checkpoint is pruned before the new one is in place. A checkpoint
that cannot be read (a truncated file, a bad disk) is reported by file name and resume falls back to
the one before it. Only the trainable parameters are stored (for LoRA: megabytes, not the whole UNet).
Under FSDP2 the trainable weights and the optimizer state are a `sharded/` folder instead of trainable.safetensors
and optimizer.pt (under DeepSpeed ZeRO a `deepspeed/` folder): every process writes its own shard
(train.sharded_state.save_sharded) between `start` and `save`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusion_dpo.config import RunConfig, save_config, to_dict
from diffusion_dpo.errors import CheckpointError, ConfigError
from diffusion_dpo.runtime import write_text_atomic
from diffusion_dpo.train.sharded_state import DEEPSPEED, SHARDED, check_sharded

log = logging.getLogger("diffusion_dpo")

_NAME = re.compile(r"^checkpoint-(\d+)$")
_OLD = ".old-"  # prefix of a checkpoint folder being replaced by a new one of the same step
# Settings that decide which tensors are trainable and their shapes: named when a checkpoint does not fit.
_SHAPE_KEYS = (("train", "finetune"), ("lora", "rank"), ("lora", "target_modules"))


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _finish_swaps(root: Path) -> None:
    """A save killed between moving checkpoint-N aside and renaming its replacement into place leaves only
    .old-checkpoint-N: put it back. Once checkpoint-N exists again the old copy is obsolete."""
    if not root.is_dir():
        return
    for old in root.glob(_OLD + "checkpoint-*"):
        final = root / old.name[len(_OLD):]
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)


def latest(root: Path) -> Optional[Path]:
    _finish_swaps(root)
    found = list_checkpoints(root)
    return found[-1] if found else None


def staging(root: Path, step: int) -> Path:
    """The folder checkpoint `step` is written into before it is renamed into place."""
    return root / f".tmp-checkpoint-{step}"


def start(root: Path, step: int) -> Path:
    """Create the empty staging folder of `step` (main process), removing what a killed save left."""
    root.mkdir(parents=True, exist_ok=True)
    _finish_swaps(root)
    for partial in root.glob(".tmp-checkpoint-*"):  # left by a save that was killed: never a valid checkpoint
        shutil.rmtree(partial)
    tmp = staging(root, step)
    tmp.mkdir()
    return tmp


def save(root: Path, step: int, model, optimizer, lr_scheduler, cfg, extra: dict, keep: Optional[int],
         scaler=None) -> Path:
    """Write checkpoint `step` (main process). model None: the weights and optimizer state are already in the
    staging folder's sharded/ (start, then train.sharded_state.save_sharded on every process)."""
    final = root / f"checkpoint-{step}"
    if model is None:
        tmp = staging(root, step)
    else:
        tmp = start(root, step)
        trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:  # fp16: the current loss scale, so a resumed run skips and scales exactly as this one
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    # Training randomness comes from per-pair generators (models.diffusion.pair_generator); the global
    # torch RNG only drives LoRA dropout, saved here so that is restored too.
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    torch.save(rng, tmp / "rng.pt")
    save_config(cfg, tmp / "config.yaml")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    # Re-saving a step (a resumed run with nothing left to do, or replacing a corrupt checkpoint): move the
    # old folder aside, never delete it, until the new one is renamed into place (_finish_swaps undoes a
    # kill in between).
    old = root / (_OLD + final.name)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    ours = []
    for path in list_checkpoints(root):
        if step_of(path) <= step:
            ours.append(path)
        else:  # this run resumed from before it (it was corrupt): a later resume must not pick it
            log.warning("removing %s: it is newer than this run's %s, which replaces its history", path, final.name)
            shutil.rmtree(path)
    if keep is not None:
        for stale in ours[:-keep]:  # oldest first: the newest `keep` stay
            shutil.rmtree(stale)
    return final


@dataclass
class Checkpoint:
    """Everything a checkpoint folder holds, read into memory before any of it is applied."""

    path: Path
    state: dict  # trainer_state.json: step and counters
    config: dict  # the resolved config of the run that wrote it
    weights: Optional[dict[str, torch.Tensor]]  # None in a sharded checkpoint: see `sharded`
    optimizer: Optional[dict]
    scheduler: dict
    rng: dict
    scaler: Optional[dict]
    sharded: Optional[Path] = None  # the sharded/ (FSDP2) or deepspeed/ folder of weights and optimizer state


def read(path: Path) -> Checkpoint:
    """Read every file of a checkpoint; CheckpointError names the file that cannot be read."""

    def part(name: str, reader) -> Any:
        try:
            return reader(path / name)
        except Exception as err:  # any failure to read a file (truncated, garbled, missing) makes it unusable
            why = (str(err).strip().splitlines() or [""])[0][:160]  # one line: torch's messages run to paragraphs
            raise CheckpointError(f"{path / name} cannot be read ({type(err).__name__}: {why})") from err

    def pt(p: Path):
        return torch.load(p, weights_only=True, map_location="cpu")

    sharded = next((path / name for name in (SHARDED, DEEPSPEED) if (path / name).is_dir()), None)
    if sharded is not None:
        check_sharded(sharded)  # the shard index; the shards themselves are read straight into the sharded model
    return Checkpoint(
        path=path,
        state=part("trainer_state.json", lambda p: json.loads(p.read_text())),
        config=part("config.yaml", lambda p: yaml.safe_load(p.read_text())),
        weights=None if sharded else part("trainable.safetensors", lambda p: load_file(str(p))),
        optimizer=None if sharded else part("optimizer.pt", pt),
        scheduler=part("scheduler.pt", pt),
        rng=part("rng.pt", pt),
        scaler=part("scaler.pt", pt) if (path / "scaler.pt").exists() else None,
        sharded=sharded,
    )


def read_latest(root: Path) -> Optional[Checkpoint]:
    """The newest readable checkpoint under root (None if there is none). An unreadable one is named in a
    warning and the one before it is used; if none can be read, CheckpointError."""
    _finish_swaps(root)
    errors = []
    for path in reversed(list_checkpoints(root)):
        try:
            return read(path)
        except CheckpointError as err:
            errors.append(str(err))
            log.warning("checkpoint %s is corrupt: %s; falling back to the one before it", path.name, err)
    if errors:
        raise CheckpointError(f"no checkpoint under {root} can be read (newest: {errors[0]}). Delete the corrupt "
                              "folders to continue from the last good one, or start over with train.resume=never")
    return None


def apply(ckpt: Checkpoint, cfg: RunConfig, model, optimizer, lr_scheduler, scaler=None, load_sharded=None) -> None:
    """Load a checkpoint into the model, optimizer, LR schedule and fp16 loss scaler (not the RNG: see
    restore_rng). A checkpoint written with other trainable tensors raises ConfigError naming the settings.
    load_sharded: train.sharded_state.load_sharded when the model is sharded (FSDP2, DeepSpeed), else None."""
    if (ckpt.sharded is None) != (load_sharded is None):
        engine = "FSDP" if ckpt.sharded is None or ckpt.sharded.name == SHARDED else "DeepSpeed"
        there, here = (f"under {engine}", "without it") if ckpt.sharded is not None else ("without FSDP or DeepSpeed",
                                                                                          "with one of them")
        raise ConfigError(f"checkpoint {ckpt.path} was written {there} and this run trains {here}: resume with the "
                          "accelerate config that wrote it, or train into a new output.dir")
    if load_sharded is not None:
        load_sharded(ckpt.sharded, model, optimizer)
        _apply_schedule(ckpt, lr_scheduler, scaler)
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(params.keys() - ckpt.weights.keys())
    unexpected = sorted(ckpt.weights.keys() - params.keys())
    reshaped = sorted(n for n in params.keys() & ckpt.weights.keys() if params[n].shape != ckpt.weights[n].shape)
    if missing or unexpected or reshaped:
        if reshaped:
            n = reshaped[0]
            detail = f"{n} is {tuple(ckpt.weights[n].shape)} there, {tuple(params[n].shape)} here"
        else:
            detail = f"{len(missing)} trainable tensors missing, {len(unexpected)} unexpected"
        ours = to_dict(cfg)
        changed = [f"{s}.{k}={ckpt.config.get(s, {}).get(k)!r} there, {ours[s][k]!r} here" for s, k in _SHAPE_KEYS
                   if ckpt.config.get(s, {}).get(k) != ours[s][k]]
        raise ConfigError(f"checkpoint {ckpt.path} does not fit this model ({detail}): "
                          f"{'; '.join(changed) or 'it was written by a different model'}. Use the checkpoint's "
                          "settings, or train into a new output.dir")
    with torch.no_grad():
        for name, tensor in ckpt.weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(ckpt.optimizer)
    _apply_schedule(ckpt, lr_scheduler, scaler)


def _apply_schedule(ckpt: Checkpoint, lr_scheduler, scaler) -> None:
    lr_scheduler.load_state_dict(ckpt.scheduler)
    if scaler is not None and ckpt.scaler is not None:
        scaler.load_state_dict(ckpt.scaler)


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines written past the checkpoint (they will be recomputed) and a line cut
    short by a kill or a full disk (warned, never fatal: the checkpoint, not this log, is the run's state)."""
    if not path.is_file():
        return
    keep = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            past = record["step"] > step
        except (ValueError, TypeError, KeyError):
            log.warning("%s line %d is not a complete record (a write cut short); dropped", path, number)
            continue
        if not past:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))  # a kill leaves the old or the new file
