"""Stable Diffusion 3 / 3.5: an MMDiT (SD3Transformer2DModel) trained by flow matching (families/flowbase.py),
text from CLIP-L + CLIP-G + T5, pooled projections of both CLIPs."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffusion_dpo.models.encode import TextConditioning
from diffusion_dpo.models.families.flowbase import FlowMatchingFamily, t5_states
from diffusion_dpo.models.families.sd import clip_token_ids
from diffusion_dpo.models.loading import PipelineConfigs


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    network_class = "SD3Transformer2DModel"
    t5_max_length = 256  # StableDiffusion3Pipeline's max_sequence_length default
    text_encoder_parts = (("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                          ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                          ("tokenizer_3", "text_encoder_3", "T5EncoderModel"))
    # Both streams of every joint block: the image stream's attention (to_q/k/v/out.0) and the text (context)
    # stream's (add_q/k/v_proj, to_add_out). MMDiT attends over the concatenated image and text tokens, so an
    # adapter on the image stream alone cannot change how text is read; diffusers' train_dreambooth_lora_sd3.py
    # uses this same set as its default.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def preset_values(cls, preset: str, configs: Optional[PipelineConfigs]) -> dict[str, Any]:
        """model-card: the diffusers example of the checkpoint's model card, the checkpoint told apart by its transformer
        config: dual attention layers = SD3.5 Medium (40 steps, guidance 4.5); QK normalisation without them = SD3.5
        Large (28, 3.5; Large Turbo has the same config: pass --steps 4 --guidance 0); neither = SD3 Medium (28, 7.0,
        also StableDiffusion3Pipeline's defaults). Every other preset: the pipeline's default guidance."""
        if preset != "model-card" or configs is None:
            return super().preset_values(preset, configs)
        import diffusers

        transformer = configs.part("transformer", diffusers.SD3Transformer2DModel)
        if transformer.get("dual_attention_layers"):
            return {"steps": 40, "guidance": 4.5}
        if transformer.get("qk_norm"):
            return {"steps": 28, "guidance": 3.5}
        return {"steps": 28, "guidance": 7.0}

    @classmethod
    def encode_prompts(cls, encoders: list[tuple[Any, Any]], prompts: list[str], device) -> TextConditioning:
        """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states concatenated on the feature axis
        and zero-padded to the T5 width, then the T5 states appended on the sequence axis, (B, 77 + 256, D_t5);
        pooled = both CLIPs' projected outputs concatenated, (B, D_l + D_g)."""
        hidden, pooled = [], []
        for tokenizer, encoder in encoders[:2]:
            out = encoder(clip_token_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = t5_states(*encoders[2], prompts, cls.t5_max_length, device)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextConditioning(torch.cat([clip, t5], dim=-2).float(), torch.cat(pooled, dim=-1).float())

    def predict(self, net, noisy, timesteps, cond, pair_cond=None, guidance=None):
        """The transformer's velocity; timestep = sigma * 1000 in float32, as the pipeline passes it."""
        dtype = next(net.parameters()).dtype  # works for DDP-wrapped networks too
        return net(hidden_states=noisy.to(dtype), encoder_hidden_states=cond.prompt_embeds.to(dtype),
                   pooled_projections=cond.pooled_prompt_embeds.to(dtype), timestep=timesteps.float(),
                   return_dict=False)[0]
