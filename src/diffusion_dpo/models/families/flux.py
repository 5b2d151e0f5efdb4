"""Flux.1: a double- and single-stream transformer (FluxTransformer2DModel) trained by flow matching
(families/flowbase.py) on 2x2-packed latent tokens with position ids; text = T5 states + the CLIP-L pooled output;
dev checkpoints are guidance-distilled (the guidance value is an input: flow.guidance)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.models.encode import TextConditioning
from diffusion_dpo.models.families.flowbase import FlowMatchingFamily, t5_states
from diffusion_dpo.models.families.sd import clip_token_ids
from diffusion_dpo.models.loading import PipelineConfigs


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    network_class = "FluxTransformer2DModel"
    t5_max_length = 512  # FluxPipeline's max_sequence_length default
    text_encoder_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),
                          ("tokenizer_2", "text_encoder_2", "T5EncoderModel"))
    # As SD3 (families/sd3.py): both streams' attention in the double blocks; in the single blocks peft matches
    # to_q/to_k/to_v (their output projection is proj_out, left frozen).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def preset_values(cls, preset: str, configs: Optional[PipelineConfigs]) -> dict[str, Any]:
        """model-card: FLUX.1-dev (a guidance embedding) 50 steps, embedded guidance 3.5 (its model card and the
        diffusers Flux docs); FLUX.1-schnell (none) 4 steps and no guidance (its card: guidance_scale 0, which the
        pipeline ignores). Every other preset: the pipeline's default guidance (3.5)."""
        if preset != "model-card" or configs is None:
            return super().preset_values(preset, configs)
        return {"steps": 50, "guidance": 3.5} if _guidance_embeds(configs) else {"steps": 4, "guidance": None}

    @classmethod
    def check_sampling(cls, configs: Optional[PipelineConfigs], guidance: Optional[float],
                       negative_prompt: Optional[str]) -> None:
        """FluxPipeline's guidance_scale is the value fed to the guidance embedding (not classifier-free guidance),
        and it drops guidance_scale without one (schnell) and a negative prompt unless true_cfg_scale > 1: refuse
        both rather than record settings that did nothing."""
        if negative_prompt is not None:
            raise ConfigError("--negative-prompt: FluxPipeline ignores a negative prompt (it has no classifier-free "
                              "guidance at its default true_cfg_scale 1); drop the flag")
        if guidance is not None and configs is not None and not _guidance_embeds(configs):
            raise ConfigError(f"--guidance {guidance}: this Flux transformer has no guidance embedding (a timestep-"
                              "distilled checkpoint such as FLUX.1-schnell), so FluxPipeline would ignore it; drop "
                              "--guidance")

    @classmethod
    def encode_prompts(cls, encoders: list[tuple[Any, Any]], prompts: list[str], device) -> TextConditioning:
        """As FluxPipeline.encode_prompt: T5 states (B, 512, D_t5); pooled = CLIP-L's pooled output (B, D_l)."""
        (clip_tok, clip), (t5_tok, t5) = encoders
        pooled = clip(clip_token_ids(clip_tok, prompts, device), output_hidden_states=False).pooler_output
        return TextConditioning(t5_states(t5_tok, t5, prompts, cls.t5_max_length, device).float(), pooled.float())

    def image_latents(self, latents: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """FluxPipeline's latents are packed 2x2 tokens (N, h/2 * w/2, 4C): unpacked."""
        return unpack_latents(latents, latent_shape[1], latent_shape[2])

    def default_resolution(self, network) -> int:
        """FluxPipeline's default_sample_size (128 latents) times the VAE's downsampling: its config has no sample_size."""
        return 128 * self.spec.vae_downsample

    def predict(self, net, noisy, timesteps, cond, pair_cond=None, guidance=None):
        """Pack (N, C, h, w) into (N, h/2 * w/2, 4C) tokens, call the transformer with the pipeline's position ids
        (text ids zero) and timestep sigma (= timestep / 1000: the transformer multiplies by 1000 again), guidance
        `guidance` (N,) or flow.guidance for a guidance-distilled network, and unpack the velocity."""
        dtype = next(net.parameters()).dtype  # works for DDP-wrapped networks too
        n, _, h, w = noisy.shape
        g = None
        if self.spec.guidance_embeds:
            g = torch.full((n,), self.flow.guidance, device=noisy.device) if guidance is None else guidance
            g = g.float()
        out = net(hidden_states=pack_latents(noisy).to(dtype), encoder_hidden_states=cond.prompt_embeds.to(dtype),
                  pooled_projections=cond.pooled_prompt_embeds.to(dtype),
                  timestep=(timesteps.float() / self.spec.num_train_timesteps).to(dtype),
                  img_ids=latent_image_ids(h, w, noisy.device, dtype),
                  txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=noisy.device, dtype=dtype),
                  guidance=g, return_dict=False)[0]
        return unpack_latents(out, h, w)


def _guidance_embeds(configs: PipelineConfigs) -> bool:
    import diffusers

    return bool(configs.part("transformer", diffusers.FluxTransformer2DModel).get("guidance_embeds", False))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch one token, row-major (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (N, h/2, w/2, C, 2, 2)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h/2 * w/2, 4C) -> (N, C, h, w): the inverse of pack_latents (FluxPipeline._unpack_latents)."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (N, C, h/2, 2, w/2, 2)
    return x.reshape(n, d // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column) (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)
