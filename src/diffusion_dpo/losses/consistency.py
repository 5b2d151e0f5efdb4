"""Consistency-DPO (Curriculum-DPO, arXiv 2405.13637, public code): the DPO contrast on the consistency-distillation
distance of a latent consistency model instead of the denoising error.

    d_pol(x) = pseudo-Huber(f_student(x_t, t, w), target),  d_ref(x) = the same with the reference's f
    code:  loss = -log sigmoid(-beta_code * ((d_pol_w - d_ref_w) - (d_pol_l - d_ref_l)))
    here:  loss = -log sigmoid(dpo_logit(d_pol_w, d_pol_l, d_ref_w, d_ref_l, train.beta))

The distances are computed by train.consistency.consistency_errors (the step's error function for this method)
and arrive as PairErrors, so this is the DPO loss on other errors: one logit (losses.dpo.dpo_logit).

Beta convention: dpo_logit is -beta/2 * Delta, the code's logit -beta_code * Delta, so train.beta = 2 * beta_code:
the code's beta 200 (searched 50-500) is train.beta = 400 here. At initialisation (student == reference) every
logit is 0 and the loss is ln 2.
"""

from __future__ import annotations

from typing import Any

from diffusion_dpo.losses.dpo import DPOLoss


class ConsistencyDPOLoss(DPOLoss):
    """DPOLoss on consistency distances; its loss.* keys (huber_c, guidance_range, solver_steps) shape the
    distances (train.consistency), not the logit."""

    @classmethod
    def from_settings(cls, beta: float, **settings: Any) -> "ConsistencyDPOLoss":
        return cls(beta)
