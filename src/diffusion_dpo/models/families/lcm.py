"""Latent consistency models (a UNet with a guidance-scale embedding, `time_cond_proj_dim`): SD otherwise.

The guidance embedding itself is SDFamily.timestep_cond (any UNet with time_cond_proj_dim gets it)."""

from __future__ import annotations

from diffusion_dpo.models.families.sd import SDFamily
from diffusion_dpo.models.loading import PipelineConfigs


class LCMFamily(SDFamily):
    name = "lcm"
    pipeline_class = "LatentConsistencyModelPipeline"
    # the pipeline's own default (8.5) in every preset but model-card: LCM_Dreamshaper_v7's card samples 4 steps at 8.0
    preset_guidance: dict[str, float] = {"model-card": 8.0}
    preset_steps = {"model-card": 4}

    @classmethod
    def matches(cls, configs: PipelineConfigs) -> bool:
        return configs.unet().get("time_cond_proj_dim") is not None
