"""Resumable checkpoints: trainable weights, optimizer, LR schedule, RNG states, step and config.

Layout: <output>/checkpoints/checkpoint-<step>/ with trainable.safetensors, optimizer.pt,
scheduler.pt, rng.pt, trainer_state.json, config.yaml. A checkpoint is written into a temporary
folder and renamed, so a crash never leaves a half-written one that resume would pick up.
Only the trainable parameters are stored (for LoRA: megabytes, not the whole UNet).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from diffusion_dpo.config import save_config

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save(root: Path, step: int, model, optimizer, lr_scheduler, cfg, extra: dict, keep: Optional[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    # Training randomness comes from per-pair generators (models.diffusion.pair_generator); the global
    # torch RNG only drives LoRA dropout, saved here so that is restored too.
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    torch.save(rng, tmp / "rng.pt")
    save_config(cfg, tmp / "config.yaml")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def load(path: Path, model, optimizer, lr_scheduler) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable parameters (e.g. {missing[0]}): "
                           "it was written by a different model or LoRA setting")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines written past the checkpoint (they will be recomputed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
