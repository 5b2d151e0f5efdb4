"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM noise; epsilon or v prediction."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffusion_dpo.models.diffusion import prediction_target
from diffusion_dpo.models.encode import TextConditioning, guidance_embedding
from diffusion_dpo.models.families.base import ModelFamily
from diffusion_dpo.models.loading import PipelineConfigs


class SDFamily(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    preset_guidance = {"paper": 7.5, "drawbench-sd": 7.5}  # Diffusion-DPO notebook; Curriculum-DPO's DrawBench

    @classmethod
    def matches(cls, configs: PipelineConfigs) -> bool:
        return "StableDiffusion" in configs.pipeline_class or "LatentConsistency" in configs.pipeline_class

    @classmethod
    def encode_prompts(cls, encoders: list[tuple[Any, Any]], prompts: list[str], device) -> TextConditioning:
        """Last hidden state of the CLIP text encoder (as StableDiffusionPipeline.encode_prompt)."""
        hidden = [encoder(clip_token_ids(tokenizer, prompts, device)).last_hidden_state
                  for tokenizer, encoder in encoders]
        return TextConditioning(torch.cat(hidden, dim=-1).float())

    def noisy_and_target(self, scheduler, latents, noise, timesteps):
        """DDPM forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; target eps or v (scheduler.prediction_type)."""
        return scheduler.add_noise(latents, noise, timesteps), prediction_target(scheduler, latents, noise, timesteps)

    def predict(self, net, noisy, timesteps, cond, pair_cond=None, guidance=None):
        dtype = next(net.parameters()).dtype  # works for DDP-wrapped networks too (no .dtype there)
        return net(noisy.to(dtype), timesteps, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                   added_cond_kwargs=self.added_cond(cond, pair_cond, dtype),
                   timestep_cond=self.timestep_cond(noisy, dtype, guidance),
                   return_dict=False)[0]

    def added_cond(self, cond: TextConditioning, pair_cond: Optional[torch.Tensor], dtype) -> Optional[dict]:
        """The UNet's added conditioning (SDXL: pooled text + time ids); none for SD."""
        return None

    def timestep_cond(self, noisy: torch.Tensor, dtype, guidance: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A latent consistency UNet (time_cond_proj_dim set, whatever the family) gets the guidance-scale
        embedding of `guidance_scale` (model.lcm_guidance_scale), or of the per-row scales `guidance` (N,), as
        LatentConsistencyModelPipeline computes it."""
        dim = self.spec.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.full((noisy.shape[0],), self.guidance_scale, device=noisy.device) if guidance is None else guidance
        return guidance_embedding(w, dim).to(noisy.device, dtype)


def clip_token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
