"""Pure flow-matching maths (rectified flow: SD3 / SD3.5, Flux.1), in one place.

Forward process (Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 1 with a_t = 1 - t, b_t = t):

    x_sigma = (1 - sigma) * x0 + sigma * noise,    the network predicts the velocity  v = noise - x0.

Sigma sampling follows diffusers' SD3 / Flux training scripts (train_dreambooth_sd3.py, train_dreambooth_flux.py):
`u` from a weighting scheme (training_utils.compute_density_for_timestep_sampling: uniform, logit-normal, mode),
then the scheduler's discrete table: index = floor(u * N), sigma = (N - index) / N (FlowMatchEulerDiscreteScheduler's
timesteps 1..N over N), mapped by the static shift (SD3: 3.0) or by Flux's resolution-dependent shift (the pipeline's
calculate_shift + the scheduler's exponential time shift). The network's timestep input is sigma * N, as the
pipelines pass it (Flux's transformer divides by 1000 again: FluxFamily.predict).

Errors: optionally weighted per sample by compute_loss_weighting_for_sd3 (sigma_sqrt, cosmap); the weight multiplies
the squared error of policy and reference alike, so the DPO difference is weighted, never the reference alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class FlowSchedule:
    """The shift settings of a pipeline's FlowMatchEulerDiscreteScheduler config (recorded in ModelSpec.extra)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FlowSchedule":
        fields = cls.__dataclass_fields__
        return cls(**{k: config[k] for k in fields if config.get(k) is not None})


def draw_u(generator: torch.Generator, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
           mode_scale: float = 1.29) -> torch.Tensor:
    """One draw u in [0, 1] (shape (1,)) by diffusers' compute_density_for_timestep_sampling: 'uniform' U(0, 1);
    'logit_normal' sigmoid(N(mean, std)) (SD3 paper section 3.1, default mean 0 std 1); 'mode'
    1 - u - s * (cos^2(pi u / 2) - 1 + u) (SD3 paper eq. 20, "mode sampling with heavy tails")."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(1,), generator=generator))
    u = torch.rand((1,), generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme != "uniform":
        raise ValueError(f"unknown weighting scheme {scheme!r} (uniform, logit_normal, mode)")
    return u


def static_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """shift * s / (1 + (shift - 1) * s): FlowMatchEulerDiscreteScheduler's shift (SD3 paper eq. 23, alpha = shift)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_mu(image_seq_len: int, schedule: FlowSchedule) -> float:
    """The Flux pipeline's calculate_shift: mu linear in the image token count, base_shift at base_image_seq_len
    and max_shift at max_image_seq_len."""
    m = (schedule.max_shift - schedule.base_shift) / (schedule.max_image_seq_len - schedule.base_image_seq_len)
    return image_seq_len * m + schedule.base_shift - m * schedule.base_image_seq_len


def time_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1 / s - 1)): the scheduler's exponential time shift (equal to static_shift with
    shift = exp(mu))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def sigma_of_u(u: torch.Tensor, schedule: FlowSchedule, shift: float, mu: Optional[float]) -> torch.Tensor:
    """u in [0, 1] -> sigma in (0, 1] through the scheduler's N-level table, as the training scripts index it
    (index = floor(u N), clamped to N - 1 for u = 1), then the resolution shift (mu given) or the static shift."""
    n = schedule.num_train_timesteps
    index = (u * n).long().clamp(0, n - 1)
    sigma = (n - index).float() / n
    return time_shift(sigma, mu) if mu is not None else static_shift(sigma, shift)


def sigma_sampler(settings: Any, schedule: FlowSchedule, image_seq_len: int) -> Callable[[torch.Generator], torch.Tensor]:
    """generator -> the network's timestep input sigma * N, shape (1,): what draw_pair_randomness draws per pair.
    `settings`: a config.FlowConfig (weighting_scheme, logit_mean, logit_std, mode_scale, shift, resolution_shift);
    shift None = the scheduler's (unused by a dynamic-shifting scheduler), resolution_shift None = the scheduler's
    use_dynamic_shifting."""
    shift, mu = shift_settings(settings, schedule, image_seq_len)

    def draw(generator: torch.Generator) -> torch.Tensor:
        u = draw_u(generator, settings.weighting_scheme, settings.logit_mean, settings.logit_std, settings.mode_scale)
        return sigma_of_u(u, schedule, shift, mu) * schedule.num_train_timesteps

    return draw


def shift_settings(settings: Any, schedule: FlowSchedule, image_seq_len: int) -> tuple[float, Optional[float]]:
    """(static shift, resolution mu or None) of sigma_of_u for these flow settings, as sigma_sampler documents."""
    dynamic = schedule.use_dynamic_shifting if settings.resolution_shift is None else settings.resolution_shift
    mu = resolution_mu(image_seq_len, schedule) if dynamic else None
    shift = settings.shift if settings.shift is not None else (1.0 if schedule.use_dynamic_shifting else schedule.shift)
    return shift, mu


def stratified_timesteps(settings: Any, schedule: FlowSchedule, image_seq_len: int, k: int) -> torch.Tensor:
    """K fixed network timestep inputs (sigma * N, float32, ascending) standing for sigma_sampler's draws: the
    weighting scheme's quantiles at p = (i + 0.5) / K (uniform: p; logit_normal: sigmoid(mean + std Phi^-1(p));
    mode: the mode transform of p, which is monotone for the allowed mode_scale, so its values at this symmetric
    grid are its quantiles), through the same table and shifts. For implicit-reward accuracy: a low-variance,
    deterministic stand-in for the training distribution of sigma."""
    p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    if settings.weighting_scheme == "logit_normal":
        u = torch.sigmoid(settings.logit_mean + settings.logit_std * math.sqrt(2) * torch.erfinv(2 * p - 1))
    elif settings.weighting_scheme == "mode":
        u = 1 - p - settings.mode_scale * (torch.cos(math.pi * p / 2) ** 2 - 1 + p)
    else:
        u = p
    shift, mu = shift_settings(settings, schedule, image_seq_len)
    sigma = sigma_of_u(u.float(), schedule, shift, mu)
    return torch.sort(sigma * schedule.num_train_timesteps).values


def sigmas_of(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The network's timestep inputs (N,) -> sigmas (N, 1, 1, 1) float32, to broadcast over latents."""
    return (timesteps.float() / num_train_timesteps).view(-1, 1, 1, 1)


def noisy_and_velocity(latents: torch.Tensor, noise: torch.Tensor,
                       sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_sigma = (1 - sigma) x0 + sigma noise, target = noise - x0 (the velocity d x_sigma / d sigma).
    latents, noise (N, C, h, w); sigmas (N, 1, 1, 1)."""
    return (1.0 - sigmas) * latents + sigmas * noise, noise - latents


def loss_weight(scheme: str, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-sample error weights (N,) of compute_loss_weighting_for_sd3: 'sigma_sqrt' sigma^-2, 'cosmap'
    2 / (pi (1 - 2 sigma + 2 sigma^2)) (SD3 paper section 3.1); None for 'none' (weight 1)."""
    s = sigmas.flatten().float()
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    if scheme != "none":
        raise ValueError(f"unknown loss weighting {scheme!r} (none, sigma_sqrt, cosmap)")
    return None
