"""MaPO, margin-aware preference optimisation without a reference (Hong et al., arXiv 2406.06424; the official
code, github.com/mapo-t2i/mapo train.py, whose form is ported here).

Per pair, with the policy's per-sample errors e_w, e_l (means over latent elements, as the official code):

    f(e)     = s*e / (exp(s*e) - 1)               a bounded, decreasing score in (0, 1]: f(0) = 1, f(inf) = 0
    margin   = f(e_w) - f(e_l)                    > 0 when the winner is denoised better than the loser
    loss     = e_w - lambda * log sigmoid(T * margin)

s = loss.mapo_snr (official default 0.5, "a constant in place of the SNR"), T = loss.mapo_scale (official: the
scheduler's num_train_timesteps, 1000: "maximise the margin through the whole denoising process"), lambda =
loss.mapo_weight (official beta_mapo, default 0.1). The first term is the winner's plain diffusion loss (SFT
on preferred images); the second is the log-odds margin term. train.beta is not used.
Mapping: the official code takes the likelihood p(x) of an image as a function of its diffusion error
(exp(-s*e)-like) and f as the bounded link of its log-odds; we did not check the paper's equations against
this form line by line: the port follows the code (values in tests/unit/test_losses.py are checked against
an independent re-implementation of the code's expression).
Needs: losers (paired data); no reference forward at all (needs_reference False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_dpo.losses.base import LossOutput, PairErrors, PreferenceLoss


def mapo_score(err: torch.Tensor, snr: float) -> torch.Tensor:
    """f(e) = s e / (exp(s e) - 1), with its limit 1 at e = 0 (expm1 keeps it exact for small s e)."""
    x = snr * err
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), safe / torch.expm1(safe))


class MaPOLoss(PreferenceLoss):
    needs_reference = False
    takes_beta = False
    needs_losers = True

    def __init__(self, mapo_weight: float = 0.1, mapo_snr: float = 0.5, mapo_scale: float = 1000.0):
        super().__init__()
        self.weight, self.snr, self.scale = mapo_weight, mapo_snr, mapo_scale


    def forward(self, errors: PairErrors) -> LossOutput:
        pw, pl = errors.policy_w, errors.policy_l
        margin = mapo_score(pw, self.snr) - mapo_score(pl, self.snr)  # (B,)
        margin_loss = -F.logsigmoid(self.scale * margin)
        per_pair = pw + self.weight * margin_loss
        metrics = {"implicit_acc": (margin > 0).float().mean(), "err_policy_w": pw.mean(), "err_policy_l": pl.mean(),
                   "diff_policy": (pw - pl).mean(), "mapo_margin": margin.mean(),
                   "mapo_margin_loss": margin_loss.mean()}
        return LossOutput(per_pair.mean(), per_pair, {k: v.detach() for k, v in metrics.items()})
