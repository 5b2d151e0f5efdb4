"""What the planner knows of a model: its components' real configs (a local pipeline folder's, or the published
ones of models.arch_configs), the classes built from them, and the inputs the trained network takes.

The inputs are those its family passes at training time (models/families: SD/SDXL `predict`; the flow-matching
families of SD3 and Flux feed the same tensors as their diffusers training scripts): one text conditioning per
row with the encoders' token counts, pooled text where the network takes it, SDXL's six time ids, Flux's 2x2
packed latent tokens with their position ids and its guidance value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

T5_TOKENS = {"SD3Transformer2DModel": 256, "FluxTransformer2DModel": 512}
"""Tokens per prompt of a T5 encoder: the pipelines' default max_sequence_length (SD3, Flux.1-dev)."""


@dataclass
class ModelDesc:
    source: str
    """Where the configs came from (a folder, or '<arch> (published configs)')."""
    network_class: str
    network_config: dict[str, Any]
    vae_config: dict[str, Any]
    encoders: list[tuple[str, str, dict[str, Any], int]]
    """(subfolder, transformers class name, config, tokens per prompt) per text encoder, in order."""

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's latent at `resolution` pixels."""
        down = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        return int(self.vae_config.get("latent_channels", 4)), resolution // down, resolution // down

    @property
    def default_resolution(self) -> int:
        """The VAE's sample_size (the resolution the pipeline was made for), or 512."""
        return int(self.vae_config.get("sample_size", 512))


def describe_arch(arch: str) -> ModelDesc:
    """A named real architecture (models.arch_configs.ARCHS), from its published configs."""
    from diffusion_dpo.models import arch_configs

    return ModelDesc(f"{arch} (published configs)", arch_configs.network_class(arch), arch_configs.network_config(arch),
                     arch_configs.vae_config(arch), arch_configs.text_encoder_configs(arch))


def describe_folder(folder: str | Path) -> ModelDesc:
    """A local diffusers pipeline folder: model_index.json and each component's config.json (no weights read)."""
    from diffusion_dpo.errors import ModelLoadError

    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"'{folder}' has no model_index.json: point model.pretrained to a local diffusers pipeline "
                             "folder, or pass --arch to plan with a named architecture's published configs")
    index = json.loads(index_file.read_text())
    part = next((p for p in ("transformer", "unet") if isinstance(index.get(p), list) and index[p][1]), None)
    if part is None:
        raise ModelLoadError(f"'{index_file}' names no unet or transformer: it is not a text-to-image pipeline")
    network_class = index[part][1]

    def config(sub: str) -> dict[str, Any]:
        path = folder / sub / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"'{path}' is missing: the pipeline folder is incomplete (re-save it with "
                                 "save_pretrained)")
        return json.loads(path.read_text())

    encoders = []
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if isinstance(index.get(sub), list) and index[sub][1]:
            cls, cfg = index[sub][1], config(sub)
            tokens = T5_TOKENS.get(network_class, 77) if cls.startswith("T5") else int(cfg.get("max_position_embeddings", 77))
            encoders.append((sub, cls, cfg, tokens))
    return ModelDesc(str(folder), network_class, config(part), config("vae"), encoders)


def build_network(desc: ModelDesc) -> torch.nn.Module:
    """The trained network (diffusers class), random-initialised; call under torch.device('meta')."""
    import diffusers

    cls = getattr(diffusers, desc.network_class)
    return cls.from_config({k: v for k, v in desc.network_config.items() if not k.startswith("_")})


def build_encoders(desc: ModelDesc, dtype: torch.dtype) -> tuple[torch.nn.Module, list[tuple[torch.nn.Module, int]]]:
    """The frozen VAE and [(text encoder, tokens per prompt)] in `dtype`; call under torch.device('meta')."""
    import diffusers
    import transformers

    vae = diffusers.AutoencoderKL.from_config({k: v for k, v in desc.vae_config.items() if not k.startswith("_")})
    encoders = []
    for _, cls, cfg, tokens in desc.encoders:
        config_cls = transformers.T5Config if cls.startswith("T5") else transformers.CLIPTextConfig
        config = config_cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        encoders.append((getattr(transformers, cls)(config).to(dtype).requires_grad_(False).eval(), tokens))
    return vae.to(dtype).requires_grad_(False).eval(), encoders


def network_inputs(desc: ModelDesc, net: torch.nn.Module, rows: int, noisy: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments of one training forward of `net` on `rows` noisy latents (rows, C, h, w)."""
    dtype = next(net.parameters()).dtype
    cfg = net.config
    tokens = sum(n for _, cls, _, n in desc.encoders if cls.startswith("T5"))
    clip_tokens = max([n for _, cls, _, n in desc.encoders if not cls.startswith("T5")], default=77)
    t = torch.randint(0, 1000, (rows,))
    if desc.network_class == "UNet2DConditionModel":
        kw: dict[str, Any] = {"sample": noisy.to(dtype), "timestep": t, "return_dict": False,
                              "encoder_hidden_states": torch.randn(rows, clip_tokens, cfg.cross_attention_dim, dtype=dtype)}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + 6 time ids (kept in float32)
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, pooled, dtype=dtype), "time_ids": torch.ones(rows, 6)}
        if cfg.time_cond_proj_dim is not None:  # latent consistency: the guidance embedding
            kw["timestep_cond"] = torch.randn(rows, cfg.time_cond_proj_dim, dtype=dtype)
        return kw
    text = torch.randn(rows, tokens + (clip_tokens if desc.network_class == "SD3Transformer2DModel" else 0),
                       cfg.joint_attention_dim, dtype=dtype)  # SD3: CLIP states (padded to T5 width) then T5 states
    pooled = torch.randn(rows, cfg.pooled_projection_dim, dtype=dtype)
    sigma = torch.rand(rows) * 1000
    if desc.network_class == "SD3Transformer2DModel":
        return {"hidden_states": noisy.to(dtype), "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": sigma, "return_dict": False}
    if desc.network_class == "FluxTransformer2DModel":  # latents packed into 2x2 patch tokens: (rows, h/2 * w/2, 4C)
        n, c, h, w = noisy.shape
        packed = noisy.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
        kw = {"hidden_states": packed.to(dtype), "encoder_hidden_states": text, "pooled_projections": pooled,
              "timestep": sigma / 1000, "img_ids": torch.zeros(h * w // 4, 3), "txt_ids": torch.zeros(tokens, 3),
              "return_dict": False}
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((rows,), 3.5)
        return kw
    from diffusion_dpo.errors import ModelLoadError

    raise ModelLoadError(f"plan: no inputs known for a {desc.network_class} (from {desc.source}); it plans "
                         "UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel networks")
