"""The `loss` section of the run config: the settings of the loss train.method names, and which loss reads which
key (LOSS_KEYS). Its own module so config.py stays a short schema; config.RunConfig holds it as `loss`. The losses
themselves are in losses/ (docs/losses.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from diffusion_dpo.errors import ConfigError


@dataclass
class LossConfig:
    """Settings of the loss train.method names; unset (null): that loss's default; a key of another loss: an error."""

    label_smoothing: Optional[float] = None
    """cdpo, rdpo: probability eps that a label is flipped, in [0, 0.5] for cdpo, [0, 0.5) for rdpo (default 0.1)."""
    soft_labels: bool = False
    """dpo: use the data's per-pair preference probability as a soft target instead of the hard label."""
    soft_label_temperature: Optional[float] = None
    """soft_labels: T > 0 in p = sigmoid(margin / T) for data with a margin column but no pref_prob (default 1)."""
    simpo_gamma: Optional[float] = None
    """simpo: target margin gamma in logit units, >= 0 (default 0.5)."""
    kto_desirable_weight: Optional[float] = None
    """kto: weight lambda_d of desirable images, > 0 (default 1)."""
    kto_undesirable_weight: Optional[float] = None
    """kto: weight lambda_u of undesirable images, > 0 (default 1)."""
    mapo_weight: Optional[float] = None
    """mapo: weight lambda of the margin term against the winner's diffusion loss, > 0 (official default 0.1)."""
    mapo_snr: Optional[float] = None
    """mapo: constant s in the score s*e/(exp(s*e)-1), > 0 (official default 0.5)."""
    mapo_scale: Optional[float] = None
    """mapo: factor T on the margin inside the log-sigmoid, > 0 (official: num_train_timesteps, 1000)."""
    huber_c: Optional[float] = None
    """consistency_dpo: constant c of the pseudo-Huber distance sqrt(d^2 + c^2) - c, > 0 (default 0.001)."""
    guidance_range: Optional[tuple[float, float]] = None
    """consistency_dpo: w ~ U[low, high] per pair (teacher: cond + w (cond - uncond)), 0 <= low <= high; default (5, 15)."""
    solver_steps: Optional[int] = None
    """consistency_dpo: DDIM solver steps over the training timesteps, >= 1 (default 50: skip 20 of 1000)."""


# The loss.* keys each train.method reads (losses.build_loss passes exactly these to the loss).
LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "dpo": ("soft_labels",), "sft": (), "ipo": (), "hinge": (), "cdpo": ("label_smoothing",),
    "rdpo": ("label_smoothing",), "kto": ("kto_desirable_weight", "kto_undesirable_weight"),
    "mapo": ("mapo_weight", "mapo_snr", "mapo_scale"), "simpo": ("simpo_gamma",),
    "consistency_dpo": ("huber_c", "guidance_range", "solver_steps"),
}


def validate_loss(method: str, loss: LossConfig) -> None:
    """Keys set for another loss, and out-of-range values, named with the fix."""
    values = dataclasses.asdict(loss)
    if values.pop("soft_label_temperature") is not None and not loss.soft_labels:  # read with the data (train.batch)
        raise ConfigError("loss.soft_label_temperature is set but loss.soft_labels is off: set loss.soft_labels=true or remove it")
    for key, value in values.items():
        if value is not None and value is not False and key not in LOSS_KEYS[method]:  # (0.0 == False)
            users = [m for m, keys in LOSS_KEYS.items() if key in keys]
            raise ConfigError(f"loss.{key} is set but train.method {method!r} does not use it (it is for "
                              f"{', '.join(users)}); remove loss.{key} or change train.method")
    eps, high_ok = loss.label_smoothing, method == "cdpo"  # rdpo divides by 1 - 2 eps
    if eps is not None and not (0.0 <= eps < 0.5 or (high_ok and eps == 0.5)):
        bound = "[0, 0.5]" if high_ok else "[0, 0.5) (rdpo divides by 1 - 2*eps)"
        raise ConfigError(f"loss.label_smoothing must be in {bound} for train.method {method!r}, got {eps}")
    if loss.simpo_gamma is not None and loss.simpo_gamma < 0:
        raise ConfigError(f"loss.simpo_gamma must be >= 0, got {loss.simpo_gamma}")
    if (g := loss.guidance_range) is not None and not 0 <= g[0] <= g[1]:
        raise ConfigError(f"loss.guidance_range must satisfy 0 <= low <= high, got {g}")
    for key in ("kto_desirable_weight", "kto_undesirable_weight", "mapo_weight", "mapo_snr", "mapo_scale", "huber_c", "solver_steps"):
        if values[key] is not None and values[key] <= 0:
            raise ConfigError(f"loss.{key} must be > 0, got {values[key]}")
