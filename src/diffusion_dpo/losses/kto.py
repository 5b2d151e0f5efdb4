"""Diffusion-KTO (Li et al., NeurIPS 2024, arXiv 2404.04465), sigmoid utility, in the official code's form
(jacklishufan/diffusion-kto, whose comment marks g - kl as the paper's eq. 8; the paper's text was not read here).

Per image x with a binary label (desirable / undesirable), under the beta convention of losses/dpo.py:

    r(x)    = -beta/2 * (e_pol(x) - e_ref(x))          the implicit reward (dpo_logit = r(w) - r(l))
    r_ref   = max(0, mean of r over the batch's images) detached: the reference point, a batch estimate of
              beta/2 * KL(policy || reference), clamped at 0 (a KL is never negative)
    loss(x) = lambda_d * (1 - sigmoid(r(x) - r_ref))   if x is desirable
              lambda_u * (1 - sigmoid(r_ref - r(x)))   if x is undesirable
    loss    = mean over all images

The official code writes beta_kto * g with g = -(e_pol - e_ref): its beta_kto is our beta/2, so the same
train.beta means the same temperature as in DPO. lambda_d, lambda_u = loss.kto_desirable_weight /
kto_undesirable_weight (default 1, 1; the original KTO paper, Ethayarajh et al. 2024, suggests
lambda_d n_d / (lambda_u n_u) in [1, 4/3] when the classes are imbalanced). At initialisation r = 0, r_ref = 0 and every image contributes lambda/2.

Labels: the w rows of PairErrors are the desirable images and the l rows the undesirable ones; their counts
may differ, and one may be empty (train.singles fills them from labelled single images: a labelled manifest,
or pairs under data.unpair; their metrics then read 0). On paired data, winners are desirable and losers
undesirable. The reference point is estimated from this micro-batch (all its images, both labels), as the
official code does per process. per_pair holds one value per image: desirable first, then undesirable.
Needs: reference; desirable and undesirable images (not necessarily paired).
"""

from __future__ import annotations

import torch

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss


class KTOLoss(PreferenceLoss):
    needs_reference = True
    needs_losers = True
    takes_labelled_images = True  # and pairs: winner desirable, loser undesirable, sharing noise and timestep

    def __init__(self, beta: float, kto_desirable_weight: float = 1.0, kto_undesirable_weight: float = 1.0):
        super().__init__()
        self.beta, self.lambda_d, self.lambda_u = beta, kto_desirable_weight, kto_undesirable_weight

    @classmethod
    def from_settings(cls, beta: float, kto_desirable_weight: float = 1.0,
                      kto_undesirable_weight: float = 1.0) -> "KTOLoss":
        return cls(beta, kto_desirable_weight, kto_undesirable_weight)

    def forward(self, errors: PairErrors) -> LossOutput:
        reward_d = -0.5 * self.beta * (errors.policy_w - errors.ref_w.detach())  # (n_d,)
        reward_u = -0.5 * self.beta * (errors.policy_l - errors.ref_l.detach())  # (n_u,)
        reference_point = torch.cat([reward_d, reward_u]).mean().clamp(min=0).detach()
        loss_d = self.lambda_d * (1 - torch.sigmoid(reward_d - reference_point))
        loss_u = self.lambda_u * (1 - torch.sigmoid(reference_point - reward_u))
        per_image = torch.cat([loss_d, loss_u])
        metrics = {
            "kto_reference_point": reference_point,
            "reward_desirable": _mean(reward_d), "reward_undesirable": _mean(reward_u),
            # the share of images on the right side of the reference point
            "implicit_acc": torch.cat([reward_d > reference_point, reward_u < reference_point]).float().mean(),
            "err_policy_w": _mean(errors.policy_w), "err_policy_l": _mean(errors.policy_l),
            "err_ref_w": _mean(errors.ref_w), "err_ref_l": _mean(errors.ref_l),
        }
        return LossOutput(per_image.mean(), per_image, {k: v.detach() for k, v in metrics.items()})


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a group's values; 0 for an empty group (a micro-batch of labelled images may hold one label only),
    where torch's mean would be NaN, which the trainer reads as a non-finite step."""
    return x.mean() if x.numel() else x.new_zeros(())
