"""SFT baseline (paper section 5): the plain diffusion loss on the preferred image only."""

from __future__ import annotations

import torch

from diffusion_dpo.losses.dpo import LossOutput


class SFTLoss(torch.nn.Module):
    needs_reference = False
    needs_losers = False

    def forward(self, err_policy: torch.Tensor, err_ref: torch.Tensor | None = None) -> LossOutput:
        """err_policy: (B,) errors of the winners."""
        return LossOutput(err_policy.mean(), err_policy, {"err_policy_w": err_policy.detach().mean()})
