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

from diffusion_dpo.losses.dpo import DPOLoss


class ConsistencyDPOLoss(DPOLoss):
    """DPOLoss on consistency distances. Its loss.* settings (defaults: Curriculum-DPO's code) shape the distances
    train.consistency computes, not the logit: huber_c the pseudo-Huber constant c, guidance_range the interval w is
    drawn from, solver_steps the DDIM solver's steps over the training timesteps."""

    def __init__(self, beta: float, huber_c: float = 0.001, guidance_range: tuple[float, float] = (5.0, 15.0),
                 solver_steps: int = 50):
        super().__init__(beta)
        self.huber_c, self.guidance_range, self.solver_steps = huber_c, tuple(guidance_range), solver_steps
