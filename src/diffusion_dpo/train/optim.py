"""Optimizers and learning-rate schedules named in the config."""

from __future__ import annotations

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
