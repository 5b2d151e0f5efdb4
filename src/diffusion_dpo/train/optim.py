"""Optimizers and learning-rate schedules named in the config, and one optimizer step (clip, fp16 loss scaling)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from diffusion_dpo.config import TrainConfig
from diffusion_dpo.errors import ConfigError


def build_optimizer(t: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if t.optimizer == "adamw":
        # the fused kernel is faster on CUDA; it is not available for CPU tensors of every dtype
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                 weight_decay=t.weight_decay, fused=fused or None)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'diffusion-dpo[bnb]' "
                              "(CUDA only), or use train.optimizer=adamw / adafactor") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                   weight_decay=t.weight_decay)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # the paper's SDXL settings: fixed learning rate, no parameter scaling, update clipping 1.0
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         clip_threshold=1.0, weight_decay=t.weight_decay)
    raise ConfigError(f"unknown train.optimizer {t.optimizer!r}")


def build_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def _scalar(norm: torch.Tensor) -> float:
    """A gradient norm as a float; under FSDP2 it is a DTensor, whose full value every process gathers."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def apply_gradients(acc, optimizer, lr_scheduler, params: list[torch.nn.Parameter], max_grad_norm: Optional[float],
                    metrics: dict[str, float]) -> tuple[float, str]:
    """Clip and apply the accumulated gradients once; zero them. Returns (grad norm, outcome): 'applied';
    'nonfinite' (a NaN/inf loss, or gradient without fp16 loss scaling: the caller applies train.on_nonfinite);
    or 'overflow' (fp16: the scaled gradients overflowed, so the GradScaler skipped the update and lowered its
    scale, as every fp16 trainer does). `metrics` are already reduced, so every process takes the same branch."""
    scaler = acc.scaler  # a GradScaler under fp16 mixed precision, else None
    if not all(math.isfinite(v) for v in metrics.values()):
        optimizer.zero_grad(set_to_none=True)  # nothing unscaled yet, so the scaler is left as it was
        return float("nan"), "nonfinite"
    if max_grad_norm is not None:
        grad_norm = _scalar(acc.clip_grad_norm_(params, max_grad_norm))  # unscales fp16 gradients first
    else:
        acc.unscale_gradients()  # no-op without a scaler; with one, the norm below is of the true gradients
        grad_norm = _scalar(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    if scaler is not None:
        # Once gradients are unscaled the scaler must see this step (scaler.step + update run inside): that is where
        # it skips an overflowed update and halves its scale. Skipping the call instead, as for a non-finite loss,
        # would leave the scale as it was and make the next unscale_ raise.
        optimizer.step()
        outcome = "overflow" if optimizer.step_was_skipped else "applied"
    elif math.isfinite(grad_norm):
        optimizer.step()
        outcome = "applied"
    else:
        outcome = "nonfinite"
    if outcome == "applied":  # as accelerate's scheduler wrapper: a skipped update does not advance the schedule
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, outcome
