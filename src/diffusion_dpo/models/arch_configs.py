"""The published configs of the real model sizes, as plain dicts: no weights, no download.

Used by `diffusion-dpo plan --arch` (the networks are instantiated from these on the meta device) and by the
real-size test builders (models.build). Each dict holds the keys of the published `config.json` that set a
parameter's shape (the class defaults fill the rest). They were written from the published files, not
downloaded here (this machine has no hub access); values marked UNSURE below are the ones not checked
against the file and should be compared with it when a hub is at hand:

- sd15   runwayml/stable-diffusion-v1-5: unet/, text_encoder/ (CLIP ViT-L/14), vae/
- sdxl   stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder/ (CLIP-L), text_encoder_2 (OpenCLIP bigG), vae/
- sd35m  stabilityai/stable-diffusion-3.5-medium: transformer/ (SD3Transformer2DModel, MMDiT-X), text_encoder/
         (CLIP-L), text_encoder_2 (bigG), text_encoder_3 (T5-XXL encoder), vae/ (16 channels)
         UNSURE: pos_embed_max_size 384 (a buffer, no parameter) and dual_attention_layers 0..12 (13 layers with a
         second attention); these give 2.24B parameters where the model card says 2.5B: compare with the file
- sd35l  stabilityai/stable-diffusion-3.5-large: transformer/ (SD3Transformer2DModel), the same encoders and VAE
- flux   black-forest-labs/FLUX.1-dev: transformer/ (FluxTransformer2DModel), text_encoder (CLIP-L),
         text_encoder_2 (T5-XXL encoder), vae/ (16 channels; its own scaling and shift)

The parameter counts these give are checked in tests/unit/models/test_arch_configs.py against the published
sizes (SD 1.5 UNet 859.5M, SDXL UNet 2.567B, SD3.5 Large 8.1B, Flux.1-dev 11.9B, T5-XXL encoder 4.76B,
CLIP-L 123M, OpenCLIP bigG 695M, the VAE 83.7M).
"""

from __future__ import annotations

import copy
from typing import Any

ARCHS = ("sd15", "sdxl", "sd35m", "sd35l", "flux")
"""The named real architectures, smallest network first."""

# ---------------------------------------------------------------- text encoders (transformers configs)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
"""openai/clip-vit-large-patch14's text tower (SD 1.5's text_encoder, SDXL/SD3's text_encoder, Flux's)."""
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
"""laion/CLIP-ViT-bigG-14's text tower (SDXL's and SD3's text_encoder_2)."""
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6)
"""google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, Flux's text_encoder_2)."""

# ---------------------------------------------------------------- VAEs (AutoencoderKL)
_VAE_4CH = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)
_VAE_16CH = dict(_VAE_4CH, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

# ---------------------------------------------------------------- networks
_UNETS = {
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64, norm_num_groups=32,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "sdxl": dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 in_channels=4, out_channels=4, sample_size=128, norm_num_groups=32,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
_SD3 = dict(attention_head_dim=64, in_channels=16, out_channels=16, joint_attention_dim=4096, patch_size=2,
            pooled_projection_dim=2048, sample_size=128, qk_norm="rms_norm")
_TRANSFORMERS = {
    "sd35m": dict(_SD3, num_attention_heads=24, num_layers=24, caption_projection_dim=1536, pos_embed_max_size=384,
                  dual_attention_layers=list(range(13))),
    "sd35l": dict(_SD3, num_attention_heads=38, num_layers=38, caption_projection_dim=2432, pos_embed_max_size=192),
    "flux": dict(attention_head_dim=128, num_attention_heads=24, num_layers=19, num_single_layers=38, in_channels=64,
                 joint_attention_dim=4096, pooled_projection_dim=768, patch_size=1, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56]),
}

_NETWORK_CLASS = {"sd15": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel",
                  "sd35m": "SD3Transformer2DModel", "sd35l": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
_ENCODERS = {  # (subfolder, transformers class, config, tokens per prompt), in the pipeline's order
    "sd15": [("text_encoder", "CLIPTextModel", _CLIP_L, 77)],
    "sdxl": [("text_encoder", "CLIPTextModel", _CLIP_L, 77),
             ("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G, 77)],
    "sd35m": [("text_encoder", "CLIPTextModelWithProjection", _CLIP_L, 77),
              ("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G, 77),
              ("text_encoder_3", "T5EncoderModel", _T5_XXL, 256)],  # StableDiffusion3Pipeline max_sequence_length
    "flux": [("text_encoder", "CLIPTextModel", _CLIP_L, 77),
             ("text_encoder_2", "T5EncoderModel", _T5_XXL, 512)],  # FluxPipeline max_sequence_length (dev)
}
_ENCODERS["sd35l"] = _ENCODERS["sd35m"]
_VAES = {"sd15": dict(_VAE_4CH, sample_size=512, scaling_factor=0.18215),
         "sdxl": dict(_VAE_4CH, sample_size=1024, scaling_factor=0.13025),
         "sd35m": dict(_VAE_16CH, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609),
         "flux": dict(_VAE_16CH, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)}
_VAES["sd35l"] = _VAES["sd35m"]
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35m": 1024, "sd35l": 1024, "flux": 1024}
"""The resolution each was trained for last (pixels): the planner's default when a config gives none."""


def _check(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def network_class(arch: str) -> str:
    """The diffusers class name of the trained network: UNet2DConditionModel, SD3Transformer2DModel or
    FluxTransformer2DModel."""
    _check(arch)
    return _NETWORK_CLASS[arch]


def network_config(arch: str) -> dict[str, Any]:
    """The trained network's config (a UNet's for sd15/sdxl, a transformer's otherwise): a fresh copy."""
    _check(arch)
    return copy.deepcopy(_UNETS.get(arch) or _TRANSFORMERS[arch])


def transformer_config(arch: str) -> dict[str, Any]:
    """The transformer config of a flow-matching arch (sd35m, sd35l, flux)."""
    if arch not in _TRANSFORMERS:
        raise ValueError(f"arch {arch!r} has no transformer; choose one of {', '.join(_TRANSFORMERS)}")
    return copy.deepcopy(_TRANSFORMERS[arch])


def text_encoder_configs(arch: str) -> list[tuple[str, str, dict[str, Any], int]]:
    """[(subfolder, transformers class name, config kwargs, tokens per prompt)] in the pipeline's order."""
    _check(arch)
    return copy.deepcopy(_ENCODERS[arch])


def vae_config(arch: str) -> dict[str, Any]:
    """The AutoencoderKL config (16 latent channels for sd35m, sd35l and flux)."""
    _check(arch)
    return copy.deepcopy(_VAES[arch])
