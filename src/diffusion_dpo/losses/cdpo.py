"""Label-noise-aware DPO: conservative DPO (cdpo) and robust DPO (rdpo), for labels flipped with probability eps.

    cdpo (Mitchell 2023, "A note on DPO with noisy preferences"; TRL loss_type="sigmoid" with label_smoothing):
        loss = mean of -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
    rdpo (Chowdhury et al., ICML 2024, "Provably Robust DPO"; TRL loss_type="robust"):
        loss = mean of [-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)] / (1 - 2 eps)

z = dpo_logit (losses/dpo.py; beta convention there), eps = loss.label_smoothing (default 0.1).
cdpo is DPO against the smoothed target 1 - eps: its minimum sits at a finite logit z = log((1-eps)/eps),
so it stops pushing confident pairs. rdpo is the unbiased correction: its expectation over labels flipped
with probability eps equals the clean-label DPO loss, so it keeps DPO's optimum (and its unboundedness);
it needs eps < 1/2. Both are ln 2 at initialisation (z = 0) for every eps, and both equal DPO at eps = 0.
Needs: reference and losers (paired data). The two share this module because they differ in one sign and
one factor.
"""

from __future__ import annotations

import torch.nn.functional as F

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss
from diffusion_dpo.losses.dpo import dpo_metrics, reference_logit


class CDPOLoss(PreferenceLoss):
    def __init__(self, beta: float, label_smoothing: float = 0.1):
        super().__init__()
        self.beta, self.eps = beta, label_smoothing

    def per_pair(self, logit):
        return -(1.0 - self.eps) * F.logsigmoid(logit) - self.eps * F.logsigmoid(-logit)

    def forward(self, errors: PairErrors) -> LossOutput:
        logit = reference_logit(errors, self.beta)
        per_pair = self.per_pair(logit)
        return LossOutput(per_pair.mean(), per_pair, dpo_metrics(errors, logit))


class RobustDPOLoss(CDPOLoss):
    def per_pair(self, logit):
        return (-(1.0 - self.eps) * F.logsigmoid(logit) + self.eps * F.logsigmoid(-logit)) / (1.0 - 2.0 * self.eps)
