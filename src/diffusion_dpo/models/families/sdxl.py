"""SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled projection of the second)
and size/crop micro-conditioning (time ids, docs/architecture.md "SDXL time ids")."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffusion_dpo.models.encode import TextConditioning, pair_time_ids
from diffusion_dpo.models.families.sd import SDFamily, clip_token_ids
from diffusion_dpo.models.loading import PipelineConfigs


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    preset_guidance = {"paper": 5.0, "drawbench-sd": 7.5}  # Diffusion-DPO notebook (SDXL 5); DrawBench as SD
    text_encoder_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),
                          ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    size_conditioned = True

    @classmethod
    def matches(cls, configs: PipelineConfigs) -> bool:
        return "XL" in configs.pipeline_class or configs.unet().get("addition_embed_type") == "text_time"

    @classmethod
    def encode_prompts(cls, encoders: list[tuple[Any, Any]], prompts: list[str], device) -> TextConditioning:
        """Penultimate hidden states of both encoders concatenated on the feature axis; pooled = the second
        encoder's projected output (as StableDiffusionXLPipeline.encode_prompt)."""
        hidden, pooled = [], None
        for tokenizer, encoder in encoders:
            out = encoder(clip_token_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if "text_embeds" in out:
                pooled = out.text_embeds
        return TextConditioning(torch.cat(hidden, dim=-1).float(), None if pooled is None else pooled.float())

    def pair_conditioning(self, batch: dict[str, Any], resolution: int, mode: str) -> Optional[torch.Tensor]:
        """Time ids (2B, 6) float32: one row per pair unless data.sdxl_time_ids=image."""
        return pair_time_ids(batch["original_size"], batch["crop_top_left"], resolution, mode, batch["indices"])

    def added_cond(self, cond: TextConditioning, pair_cond: Optional[torch.Tensor], dtype) -> Optional[dict]:
        # Time ids stay float32: the UNet's sinusoidal projection computes in float32 anyway, and a cast to
        # a bf16 network's dtype rounds sizes above 256 (683 -> 684), differently for a policy and a
        # reference of different dtypes, which would then see different conditioning.
        return {"text_embeds": cond.pooled_prompt_embeds.to(dtype), "time_ids": pair_cond.float()}
