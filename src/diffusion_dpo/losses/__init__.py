"""Preference losses, chosen by name (train.method) from a closed table.

Each loss is one module: a PreferenceLoss taking named per-sample errors (PairErrors) and returning a
LossOutput; docs/losses.md has the table "name -> paper -> formula" (and "How to add a loss")."""

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss
from diffusion_dpo.losses.dpo import DPOLoss, dpo_logit
from diffusion_dpo.losses.sft import SFTLoss

LOSSES: dict[str, type[PreferenceLoss]] = {"dpo": DPOLoss, "sft": SFTLoss}


def build_loss(method: str, beta: float) -> PreferenceLoss:
    """The loss train.method names, built from the run's loss settings."""
    if method not in LOSSES:
        raise ConfigError(f"unknown train.method {method!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[method].from_settings(beta=beta)


__all__ = ["DPOLoss", "SFTLoss", "LossOutput", "PairErrors", "PreferenceLoss", "LOSSES", "build_loss", "dpo_logit"]
