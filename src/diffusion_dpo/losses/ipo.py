"""IPO, diffusion form (Azar et al., AISTATS 2024, "A General Theoretical Paradigm to Understand Learning from
Human Preferences", eq. 17; TRL's loss_type="ipo").

IPO regresses the log-likelihood-ratio margin h onto 1/(2 tau):

    h        = dpo_logit / beta = -1/2 * ((e_pol(w) - e_ref(w)) - (e_pol(l) - e_ref(l)))
    loss     = mean over pairs of (h - 1/(2 tau))^2,   tau = train.beta

h is the DPO margin without its temperature (the diffusion log-ratio log p_pol/p_ref ~ -1/2 (e_pol - e_ref),
the official code's convention; see losses/dpo.py for the beta convention). IPO's tau plays DPO's beta (as in
TRL), so in logit units the target is dpo_logit = 1/2 for every beta: the minimum is where the policy ranks the
pair 1/2 nat more confidently than the reference, and the loss never pushes past it (DPO keeps pushing).
Sign: some ports write (h + 1/(2 tau))^2 or use the error difference as h; here h > 0 means w is ranked
correctly, and the test checks the loss falls when the winner's error falls below the target margin.
At initialisation h = 0 and the loss is 1/(4 tau^2) (6.25e-8 for tau = 2000: the loss is small in these units,
which Adam does not mind; its gradient 2 (h - 1/(2 tau)) dh is what trains).
Needs: reference and losers (paired data).
"""

from __future__ import annotations

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss
from diffusion_dpo.losses.dpo import dpo_metrics, reference_logit


class IPOLoss(PreferenceLoss):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta  # IPO's tau


    def forward(self, errors: PairErrors) -> LossOutput:
        logit = reference_logit(errors, self.beta)  # (B,) = beta * h
        margin = logit / self.beta  # h
        per_pair = (margin - 1.0 / (2.0 * self.beta)) ** 2
        return LossOutput(per_pair.mean(), per_pair, dpo_metrics(errors, logit))
