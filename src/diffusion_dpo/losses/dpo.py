"""Diffusion-DPO loss (Wallace et al., CVPR 2024, eq. 14; official code's form).

    dpo_logit = -beta/2 * ((err_policy(w) - err_policy(l)) - (err_ref(w) - err_ref(l)))
    loss      = mean over pairs of -log sigmoid(dpo_logit)

Beta convention: with error_reduction="mean" (default, the official code) each error is a MEAN over
C*H*W latent elements, so the temperature on the summed squared error is beta / (2*C*H*W): the same
beta is 4x weaker on 128x128 latents (SDXL 1024 px) than on 64x64 (SD1.5 512 px). The paper's
pseudocode writes sums; error_reduction="sum" gives that form (use a beta about C*H*W times smaller).
At initialisation (policy == reference) every logit is 0 and the loss is exactly ln 2.

Soft labels (loss.soft_labels, off by default): with a per-pair preference probability p
(PairErrors.pref_prob, e.g. sigmoid of a reward-score margin) the per-pair loss is the cross-entropy with
the soft target, -p log sigmoid(z) - (1 - p) log sigmoid(-z); p = 1 is the hard-label loss above. This is the
soft-label idea of SmPO (smoothed preference optimization); its paper was not read here, so this is
the plain soft-target form, not a port of that paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss


def dpo_logit(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
              beta: float) -> torch.Tensor:
    """THE DPO logit of each pair, (B,): -beta/2 * ((pw - pl) - (rw - rl)) (eq. 14, official convention).

    Positive when the policy lowered the preferred image's error relative to the rejected one more than the
    reference did, i.e. when the implicit reward ranks the pair correctly. beta as described in this module's
    docstring (the factor 1/2 is the official code's; the paper folds it into T * omega(lambda_t))."""
    return -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))


def reference_logit(errors: PairErrors, beta: float) -> torch.Tensor:
    """dpo_logit of the pairs in `errors`, the reference errors detached (they carry no gradient)."""
    return dpo_logit(errors.policy_w, errors.policy_l, errors.ref_w.detach(), errors.ref_l.detach(), beta)


def dpo_metrics(errors: PairErrors, logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-step metrics every DPO-family loss logs (metrics.jsonl keys), detached."""
    pw, pl, rw, rl = errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l
    metrics = {
        "implicit_acc": (logit > 0).float().mean(),
        "err_policy_w": pw.mean(), "err_policy_l": pl.mean(),
        "err_ref_w": rw.mean(), "err_ref_l": rl.mean(),
        "diff_policy": (pw - pl).mean(), "diff_ref": (rw - rl).mean(),
        "inside": logit.mean(),  # metrics.jsonl key kept: the mean DPO logit
    }
    return {k: v.detach() for k, v in metrics.items()}


def soft_label_loss(logit: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """Per pair -p log sigmoid(z) - (1 - p) log sigmoid(-z): cross-entropy of the Bradley-Terry probability
    sigmoid(z) against the target probability p that w is preferred."""
    return -prob * F.logsigmoid(logit) - (1.0 - prob) * F.logsigmoid(-logit)


class DPOLoss(PreferenceLoss):
    def __init__(self, beta: float, soft_labels: bool = False):
        super().__init__()
        self.beta, self.soft_labels = beta, soft_labels

    def forward(self, errors: PairErrors) -> LossOutput:
        logit = reference_logit(errors, self.beta)  # (B,)
        if self.soft_labels:
            if errors.pref_prob is None:
                raise ConfigError("loss.soft_labels is on but the data carries no preference probability per pair; "
                                  "set loss.soft_labels=false or use data with soft labels")
            per_pair = soft_label_loss(logit, errors.pref_prob)
        else:
            per_pair = -F.logsigmoid(logit)  # per pair, then averaged (averaging first is a known porting bug)
        return LossOutput(per_pair.mean(), per_pair, dpo_metrics(errors, logit))
