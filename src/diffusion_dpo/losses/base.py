"""What every preference loss takes and returns: named per-sample errors in, a scalar loss and metrics out.

A loss never knows how the batch was stacked (models.diffusion.split_pairs is the step's business), as
torchtune's DPO loss takes policy/reference x chosen/rejected log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from diffusion_dpo.errors import ConfigError


@dataclass
class PairErrors:
    """Per-sample denoising errors ||pred - target||^2 of B pairs, each (B,). w = preferred, l = rejected.

    Losers and the reference are None when the loss says it does not need them (needs_losers,
    needs_reference); the step then skips those forward passes.

    pref_prob: optional (B,) probability that w is preferred to l (soft labels, e.g. from AI-feedback score
    margins); None means hard labels (w preferred with probability 1). Only losses with soft_labels on read it.
    KTO reads the w rows as desirable images and the l rows as undesirable ones; there the two counts may
    differ (unpaired data)."""

    policy_w: torch.Tensor
    policy_l: Optional[torch.Tensor] = None
    ref_w: Optional[torch.Tensor] = None
    ref_l: Optional[torch.Tensor] = None
    pref_prob: Optional[torch.Tensor] = None


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what is back-propagated
    per_pair: torch.Tensor  # (B,)
    metrics: dict[str, torch.Tensor]  # scalars, detached


class PreferenceLoss(torch.nn.Module):
    """Base of the losses in losses.LOSSES: forward(PairErrors) -> LossOutput."""

    needs_reference: ClassVar[bool] = True
    needs_losers: ClassVar[bool] = True
    takes_pairs: ClassVar[bool] = True
    """Trains on preference pairs (winner, loser of one prompt, sharing noise and timestep)."""
    takes_labelled_images: ClassVar[bool] = False
    """Trains on labelled single images (PairErrors w rows desirable, l rows undesirable, counts may differ)."""

    takes_beta: ClassVar[bool] = True
    """__init__'s first argument is train.beta."""

    @classmethod
    def from_settings(cls, beta: float, **settings: Any) -> "PreferenceLoss":
        """Build from train.beta and the loss.* keys config.LOSS_KEYS lists for this loss, passed by keyword to
        __init__ (a key left unset is not passed, so __init__'s default is the loss's default)."""
        return cls(beta, **settings) if cls.takes_beta else cls(**settings)

    def forward(self, errors: PairErrors) -> LossOutput:
        raise NotImplementedError


def check_data(loss: PreferenceLoss, method: str, labelled: bool, where: str) -> None:
    """Refuse data the loss cannot train on: labelled single images for a loss that needs pairs, and vice versa."""
    if labelled and not loss.takes_labelled_images:
        raise ConfigError(f"train.method {method!r} needs preference pairs (a winner and a loser per prompt), but "
                          f"data.source {where} gives labelled single images (a labelled manifest or data.unpair); use "
                          "train.method=kto, or pair data without data.unpair")
    if not labelled and not loss.takes_pairs:
        raise ConfigError(f"train.method {method!r} needs labelled single images, but data.source {where} gives "
                          "preference pairs; set data.unpair=true or use a labelled manifest")
