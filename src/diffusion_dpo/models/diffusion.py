"""Pure diffusion maths for preference training: timesteps, shared noise, noisy inputs, targets, errors.

Pair convention: rows 0..B-1 are winners, rows B..2B-1 losers; pair i is rows i and B+i. Each pair
shares ONE noise tensor and ONE timestep (Wallace et al. 2024, official code), and the caller gives both
rows one text conditioning; the clean latents differ. For SDXL the size/crop time ids are shared too
with data.sdxl_time_ids=pair (the default); with 'image' they are each image's own and also differ.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def stack_pairs(latents_w: torch.Tensor, latents_l: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """latents_w, latents_l, noise: (B, C, h, w); timesteps: (B,) -> latents, noise (2B, C, h, w), timesteps
    (2B,): winner rows first, the pair's one noise and one timestep repeated for its loser (split_pairs undoes it)."""
    latents = torch.cat([latents_w, latents_l], dim=0)  # (2B, C, h, w)
    return latents, noise.repeat(2, 1, 1, 1), timesteps.repeat(2)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network predicts: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||pred - target||^2 per sample: mean over C,H,W (official code) or sum (paper pseudocode), times the
    per-sample `weight` (N,) when given (family.error_weight: flow.loss_weighting). (N, ...) -> (N,)"""
    sq = (pred.float() - target.float()).pow(2).flatten(1)
    err = sq.mean(dim=1) if reduction == "mean" else sq.sum(dim=1)
    return err if weight is None else err * weight.to(err.device)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> winners (B, ...), losers (B, ...)."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def pair_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one pair's randomness (noise, timestep, caption dropout, latent sampling).

    Seeded from (run seed, epoch, dataset index) only, so the draws of a pair do not depend on the
    batch size, the number of processes, gradient accumulation, or whether the run was resumed."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2**63 - 1))
    return g


def draw_pair_randomness(generators: list[torch.Generator], latent_shape: tuple[int, ...], t_low: int, t_high: int,
                         caption_dropout: float,
                         draw_timestep: Optional[Callable[[torch.Generator], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Per pair: noise (C,h,w), timestep in [t_low, t_high) (or `draw_timestep(generator)`, shape (1,): the flow
    families' sigma schemes), caption-dropout coin, two latent-sampling noises (winner, loser). Always drawn in
    the same order, whatever is used, so the streams stay aligned."""
    noise, t, drop, eps_w, eps_l = [], [], [], [], []
    for g in generators:
        noise.append(torch.randn(latent_shape, generator=g))
        t.append(torch.randint(t_low, t_high, (1,), generator=g) if draw_timestep is None else draw_timestep(g))
        drop.append(torch.rand((1,), generator=g) < caption_dropout)
        eps_w.append(torch.randn(latent_shape, generator=g))
        eps_l.append(torch.randn(latent_shape, generator=g))
    return {"noise": torch.stack(noise), "timesteps": torch.cat(t), "drop_caption": torch.cat(drop),
            "latent_eps_w": torch.stack(eps_w), "latent_eps_l": torch.stack(eps_l)}
