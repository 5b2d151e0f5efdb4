"""Diffusion-DPO loss (Wallace et al., CVPR 2024, eq. 14; official code's form).

    dpo_logit = -beta/2 * ((err_policy(w) - err_policy(l)) - (err_ref(w) - err_ref(l)))
    loss      = mean over pairs of -log sigmoid(dpo_logit)

Beta convention: with error_reduction="mean" (default, the official code) each error is a MEAN over
C*H*W latent elements, so the temperature on the summed squared error is beta / (2*C*H*W): the same
beta is 4x weaker on 128x128 latents (SDXL 1024 px) than on 64x64 (SD1.5 512 px). The paper's
pseudocode writes sums; error_reduction="sum" gives that form (use a beta about C*H*W times smaller).
At initialisation (policy == reference) every logit is 0 and the loss is exactly ln 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss


def dpo_logit(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
              beta: float) -> torch.Tensor:
    """THE DPO logit of each pair, (B,): -beta/2 * ((pw - pl) - (rw - rl)) (eq. 14, official convention).

    Positive when the policy lowered the preferred image's error relative to the rejected one more than the
    reference did, i.e. when the implicit reward ranks the pair correctly. beta as described in this module's
    docstring (the factor 1/2 is the official code's; the paper folds it into T * omega(lambda_t))."""
    return -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))


class DPOLoss(PreferenceLoss):
    needs_reference = True
    needs_losers = True

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    @classmethod
    def from_settings(cls, beta: float) -> "DPOLoss":
        return cls(beta)

    def forward(self, errors: PairErrors) -> LossOutput:
        pw, pl = errors.policy_w, errors.policy_l
        rw, rl = errors.ref_w.detach(), errors.ref_l.detach()
        diff_policy = pw - pl
        diff_ref = rw - rl
        logit = dpo_logit(pw, pl, rw, rl, self.beta)  # (B,)
        per_pair = -F.logsigmoid(logit)  # per pair, then averaged (averaging first is a known porting bug)
        metrics = {
            "implicit_acc": (logit > 0).float().mean(),
            "err_policy_w": pw.mean(), "err_policy_l": pl.mean(),
            "err_ref_w": rw.mean(), "err_ref_l": rl.mean(),
            "diff_policy": diff_policy.mean(), "diff_ref": diff_ref.mean(),
            "inside": logit.mean(),  # metrics.jsonl key kept: the mean DPO logit
        }
        return LossOutput(per_pair.mean(), per_pair, {k: v.detach() for k, v in metrics.items()})
