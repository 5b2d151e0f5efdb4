"""Hinge (SLiC-HF form; Zhao et al. 2023, "SLiC-HF", its calibration hinge with the DPO logit as the score; TRL's
loss_type="hinge").

    loss = mean over pairs of max(0, 1 - dpo_logit)

dpo_logit as in losses/dpo.py (beta convention there): beta sets the margin, 1/beta in the units of
-1/2 (Delta e_pol - Delta e_ref). Pairs whose logit is already >= 1 contribute no gradient (DPO keeps
pushing them). At initialisation every logit is 0 and the loss is exactly 1.
Needs: reference and losers (paired data).
"""

from __future__ import annotations

import torch

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss
from diffusion_dpo.losses.dpo import dpo_metrics, reference_logit


class HingeLoss(PreferenceLoss):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta


    def forward(self, errors: PairErrors) -> LossOutput:
        logit = reference_logit(errors, self.beta)
        per_pair = torch.relu(1.0 - logit)
        return LossOutput(per_pair.mean(), per_pair, dpo_metrics(errors, logit))
