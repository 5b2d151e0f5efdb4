"""The `flow` section of the run config: sigma sampling, loss weighting and embedded guidance of the
flow-matching families (SD3 / SD3.5, Flux.1; models/flow.py). Its own module so config.py stays a short schema;
config.RunConfig holds it as `flow`. The UNet families ignore it. Values and sources: docs/flow.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from diffusion_dpo.errors import ConfigError


@dataclass
class FlowConfig:
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    """How sigma is drawn per pair (diffusers' compute_density_for_timestep_sampling): 'logit_normal' (SD3 paper's
    default, diffusers' SD3 script default), 'uniform' (diffusers' Flux script's 'none'), 'mode' (heavy tails)."""
    logit_mean: float = 0.0
    """logit_normal: mean of the normal before the sigmoid (SD3 paper and diffusers: 0.0)."""
    logit_std: float = 1.0
    """logit_normal: standard deviation, > 0 (SD3 paper and diffusers: 1.0)."""
    mode_scale: float = 1.29
    """mode: the scale s of SD3 paper eq. 20 (diffusers' default 1.29), in [-1, 2/(pi-2)] so u stays in [0, 1]."""
    shift: Optional[float] = None
    """Static sigma shift s -> shift s / (1 + (shift - 1) s), > 0; null: the scheduler's `shift` (SD3/3.5: 3.0)
    unless it shifts dynamically (Flux: then none)."""
    resolution_shift: Optional[bool] = None
    """Flux's resolution-dependent shift (the pipeline's calculate_shift over the image token count); null: the
    scheduler's use_dynamic_shifting (Flux: on; SD3: off). diffusers' Flux script trains unshifted: false."""
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Per-sample weight of the velocity errors (compute_loss_weighting_for_sd3); policy and reference alike."""
    guidance: float = 3.5
    """Guidance-distilled Flux (a guidance embedding): the guidance value the network receives in training, >= 0
    (diffusers' train_dreambooth_flux.py default 3.5, the FLUX.1-dev pipeline default)."""

    def validate(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError(f"flow.shift must be > 0 (1.0: no shift), got {self.shift}")
        if not -1.0 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ConfigError(f"flow.mode_scale must be in [-1, 1.75] (else sigma leaves [0, 1]), got {self.mode_scale}")
        if self.guidance < 0:
            raise ConfigError(f"flow.guidance must be >= 0, got {self.guidance}")
