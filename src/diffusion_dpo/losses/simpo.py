"""SimPO style, reference-free (Meng et al., NeurIPS 2024, "SimPO", eq. 6, with the diffusion error in place of
the length-normalised log-likelihood).

    z_free = dpo_logit with the reference errors set to 0 = -beta/2 * (e_pol(w) - e_pol(l))
    loss   = mean over pairs of -log sigmoid(z_free - gamma)

gamma = loss.simpo_gamma (default 0.5), the target reward margin in logit units: the loss keeps pushing
until the winner's error is below the loser's by more than 2 gamma / beta. The margin is SUBTRACTED inside
the sigmoid (a positive gamma makes the loss larger, demanding a margin); a port that adds it asks for
nothing. Errors are already means over latent elements, SimPO's length normalisation. There is no value at
initialisation independent of the data (no reference: z_free is the base model's own margin).
Needs: losers (paired data); no reference forward (needs_reference False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss
from diffusion_dpo.losses.dpo import dpo_logit


class SimPOLoss(PreferenceLoss):
    needs_reference = False

    def __init__(self, beta: float, simpo_gamma: float = 0.5):
        super().__init__()
        self.beta, self.gamma = beta, simpo_gamma

    def forward(self, errors: PairErrors) -> LossOutput:
        pw, pl = errors.policy_w, errors.policy_l
        zero = torch.zeros_like(pw)
        logit = dpo_logit(pw, pl, zero, zero, self.beta) - self.gamma
        per_pair = -F.logsigmoid(logit)
        metrics = {"implicit_acc": (logit > 0).float().mean(), "err_policy_w": pw.mean(), "err_policy_l": pl.mean(),
                   "diff_policy": (pw - pl).mean(), "inside": logit.mean()}
        return LossOutput(per_pair.mean(), per_pair, {k: v.detach() for k, v in metrics.items()})
