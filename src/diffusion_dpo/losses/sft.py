"""SFT baseline (paper section 5): the plain diffusion loss on the preferred image only."""

from __future__ import annotations

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss


class SFTLoss(PreferenceLoss):
    needs_reference = False
    needs_losers = False
    takes_beta = False

    def forward(self, errors: PairErrors) -> LossOutput:
        """errors.policy_w: (B,) errors of the winners; the rest is not used."""
        err = errors.policy_w
        return LossOutput(err.mean(), err, {"err_policy_w": err.detach().mean()})
