"""Diffusion-DPO loss (Wallace et al., CVPR 2024, eq. 14; official code's form).

    diff_policy = err_policy(w) - err_policy(l)
    diff_ref    = err_ref(w)    - err_ref(l)
    inside      = -0.5 * beta * (diff_policy - diff_ref)
    loss        = mean over pairs of -log sigmoid(inside)

Beta convention: with error_reduction="mean" (default, the official code) each error is a MEAN over
C*H*W latent elements, so the temperature on the summed squared error is beta / (2*C*H*W): the same
beta is 4x weaker on 128x128 latents (SDXL 1024 px) than on 64x64 (SD1.5 512 px). The paper's
pseudocode writes sums; error_reduction="sum" gives that form (use a beta about C*H*W times smaller).
At initialisation (policy == reference) every inside term is 0 and the loss is exactly ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusion_dpo.models.diffusion import split_pairs


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what is back-propagated
    per_pair: torch.Tensor  # (B,)
    metrics: dict[str, torch.Tensor]  # scalars, detached


class DPOLoss(torch.nn.Module):
    needs_reference = True
    needs_losers = True

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, err_policy: torch.Tensor, err_ref: torch.Tensor) -> LossOutput:
        """err_policy, err_ref: (2B,) per-sample errors, winner rows first."""
        pw, pl = split_pairs(err_policy)
        rw, rl = split_pairs(err_ref.detach())
        diff_policy = pw - pl
        diff_ref = rw - rl
        inside = -0.5 * self.beta * (diff_policy - diff_ref)  # (B,)
        per_pair = -F.logsigmoid(inside)  # per pair, then averaged (averaging first is a known porting bug)
        metrics = {
            "implicit_acc": (inside > 0).float().mean(),
            "err_policy_w": pw.mean(), "err_policy_l": pl.mean(),
            "err_ref_w": rw.mean(), "err_ref_l": rl.mean(),
            "diff_policy": diff_policy.mean(), "diff_ref": diff_ref.mean(),
            "inside": inside.mean(),
        }
        return LossOutput(per_pair.mean(), per_pair, {k: v.detach() for k, v in metrics.items()})
