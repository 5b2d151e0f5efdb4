"""Pure maths of consistency distillation as Consistency-DPO uses it (Curriculum-DPO's public code, which follows
diffusers' train_lcm_distill_sd_wds.py): the DDIM solver grid, the boundary scalings, one guided DDIM step of a
teacher and the pseudo-Huber distance. No network here: train/consistency.py runs the networks.

Grid: `steps` solver steps over T training timesteps, skip k = T // steps; solver index n in [0, steps) starts
at timestep s_n = (n + 1) k - 1 and steps to t_n = max(s_n - k, 0) (T=1000, 50 steps: s in {19, 39, ..., 999}).
"""

from __future__ import annotations

import torch

def solver_timesteps(index: torch.Tensor, num_train_timesteps: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Solver indices n (N,) -> (start timesteps s_n, target timesteps t_n), int64 (N,): s_n = (n + 1) k - 1,
    t_n = max(s_n - k, 0) with k = num_train_timesteps // steps (the code's DDIMSolver and its `topk`)."""
    k = num_train_timesteps // steps
    start = (index.long() + 1) * k - 1
    return start, (start - k).clamp(min=0)


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t) = sigma_data^2 / ((t/0.1)^2 + sigma_data^2), c_out(t) = (t/0.1) / sqrt((t/0.1)^2 + sigma_data^2)
    (LCMScheduler.get_scalings_for_boundary_condition_discrete), float32 (N,). c_skip(0) = 1, c_out(0) = 0: the
    consistency function is the identity at t = 0."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def _col(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) in like's dtype and device, to scale (N, C, h, w) rows."""
    return x.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def x0_and_eps(pred: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A network's output at x_t = sqrt(a) x0 + sqrt(1 - a) eps -> (x0_hat, eps_hat); alpha_bar (N,) = a_t.
    epsilon: eps = pred, x0 = (x_t - sqrt(1 - a) eps) / sqrt(a). v: x0 = sqrt(a) x_t - sqrt(1 - a) v,
    eps = sqrt(1 - a) x_t + sqrt(a) v."""
    a = _col(alpha_bar.float(), noisy.float())
    pred, noisy = pred.float(), noisy.float()
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt(), pred
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * pred, (1 - a).sqrt() * noisy + a.sqrt() * pred
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def consistency_output(pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat (the LCM parameterisation), float32 (N, C, h, w)."""
    x0, _ = x0_and_eps(pred, noisy, alpha_bar, prediction_type)
    c_skip, c_out = boundary_scalings(t)
    return _col(c_skip, x0) * noisy.float() + _col(c_out, x0) * x0


def guided_ddim_step(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, noisy: torch.Tensor, w: torch.Tensor,
                     alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """One DDIM step (eta 0) of a teacher under classifier-free guidance, x_{s_n} -> x_{t_n}, float32.

    x0 and eps are each guided as cond + w (cond - uncond) (the code guides both, not the raw output), then
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. w (N,) is the code's w: the pipeline's guidance scale minus 1."""
    x0_c, eps_c = x0_and_eps(pred_cond, noisy, alpha_bar, prediction_type)
    x0_u, eps_u = x0_and_eps(pred_uncond, noisy, alpha_bar, prediction_type)
    w = _col(w.float(), x0_c)
    x0 = x0_c + w * (x0_c - x0_u)
    eps = eps_c + w * (eps_c - eps_u)
    a_prev = _col(alpha_bar_prev.float(), x0)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance, mean over C,H,W of sqrt(d^2 + c^2) - c with d = pred - target, (N,).
    About d^2 / (2c) for |d| << c and |d| - c for |d| >> c (the code's c = 0.001)."""
    d = (pred.float() - target.float()).flatten(1)
    return ((d.pow(2) + c * c).sqrt() - c).mean(dim=1)
