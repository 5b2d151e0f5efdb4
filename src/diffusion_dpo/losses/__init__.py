"""Preference losses, chosen by name (train.method) from a closed table.

Each loss is one module: a PreferenceLoss taking named per-sample errors (PairErrors) and returning a
LossOutput; docs/losses.md has the table "name -> paper -> formula" (and "How to add a loss").
Its settings are the loss.* keys config.LOSS_KEYS lists for it."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss, check_data
from diffusion_dpo.losses.cdpo import CDPOLoss, RobustDPOLoss
from diffusion_dpo.losses.consistency import ConsistencyDPOLoss
from diffusion_dpo.losses.dpo import DPOLoss, dpo_logit
from diffusion_dpo.losses.hinge import HingeLoss
from diffusion_dpo.losses.ipo import IPOLoss
from diffusion_dpo.losses.kto import KTOLoss
from diffusion_dpo.losses.mapo import MaPOLoss
from diffusion_dpo.losses.sft import SFTLoss
from diffusion_dpo.losses.simpo import SimPOLoss

LOSSES: dict[str, type[PreferenceLoss]] = {
    "dpo": DPOLoss, "sft": SFTLoss, "ipo": IPOLoss, "hinge": HingeLoss, "cdpo": CDPOLoss, "rdpo": RobustDPOLoss,
    "kto": KTOLoss, "mapo": MaPOLoss, "simpo": SimPOLoss, "consistency_dpo": ConsistencyDPOLoss,
}


def build_loss(method: str, beta: float, settings: Optional[Any] = None) -> PreferenceLoss:
    """The loss train.method names, built from train.beta and its loss.* settings (a config.LossConfig; keys
    left unset take the loss's own defaults)."""
    from diffusion_dpo.loss_config import LOSS_KEYS

    if method not in LOSSES:
        raise ConfigError(f"unknown train.method {method!r}; choose one of {sorted(LOSSES)}")
    values = {} if settings is None else dataclasses.asdict(settings)
    given = {k: values[k] for k in LOSS_KEYS[method] if k in values}
    return LOSSES[method].from_settings(beta=beta, **{k: v for k, v in given.items() if v is not None})


__all__ = ["CDPOLoss", "ConsistencyDPOLoss", "DPOLoss", "HingeLoss", "IPOLoss", "KTOLoss", "MaPOLoss", "RobustDPOLoss", "SFTLoss",
           "SimPOLoss", "LossOutput", "PairErrors", "PreferenceLoss", "LOSSES", "build_loss", "check_data", "dpo_logit"]
