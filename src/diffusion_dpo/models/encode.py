"""Frozen encoders: prompts -> text conditioning, pixels -> VAE latent distribution.

Used both on the fly by the trainer and once by `diffusion-dpo prepare` (the cache), so the two
paths compute exactly the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

import torch

from diffusion_dpo.errors import DataError


@dataclass
class TextConditioning:
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: Optional[torch.Tensor] = None  # (B, D2): SDXL, SD3, Flux

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name: what the cache stores per prompt (cache/store.py), whatever the family."""
        return {name: t for name, t in vars(self).items() if t is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "TextConditioning":
        """The conditioning held in `tensors` under the field names (other keys are ignored)."""
        return cls(**{name: tensors[name] for name in TEXT_FIELDS if name in tensors})

    def repeat_pairs(self) -> "TextConditioning":
        """(B, ...) -> (2B, ...): the same conditioning for the winner rows and the loser rows."""
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds.repeat(2, 1)
        return TextConditioning(self.prompt_embeds.repeat(2, 1, 1), pooled)

    def to(self, device=None, dtype=None) -> "TextConditioning":
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds.to(device, dtype)
        return TextConditioning(self.prompt_embeds.to(device, dtype), pooled)

    def select(self, mask: torch.Tensor, other: "TextConditioning") -> "TextConditioning":
        """Rows where `mask` is True take `other`'s rows (broadcast from one row): caption dropout."""
        m = mask.view(-1, 1, 1).to(self.prompt_embeds.device)
        embeds = torch.where(m, other.prompt_embeds.expand_as(self.prompt_embeds), self.prompt_embeds)
        pooled = None
        if self.pooled_prompt_embeds is not None:
            pooled = torch.where(m[:, :, 0], other.pooled_prompt_embeds.expand_as(self.pooled_prompt_embeds),
                                 self.pooled_prompt_embeds)
        return TextConditioning(embeds, pooled)


TEXT_FIELDS = tuple(f.name for f in fields(TextConditioning))
"""The tensor fields of a text conditioning, by name (the cache's names for them)."""


class PromptEncoder:
    """Prompts -> TextConditioning with a family's frozen text encoders (its encode_prompts rule: SD the last
    hidden state, SDXL both encoders' penultimate states and a pooled projection; models/families/)."""

    def __init__(self, family, encoders: list, device: torch.device | str = "cpu"):
        self.family = family  # a models.families.ModelFamily
        self.encoders = encoders  # [(tokenizer, text_encoder)]
        self.device = torch.device(device)

    def to(self, device) -> "PromptEncoder":
        self.device = torch.device(device)
        for _, enc in self.encoders:
            enc.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> TextConditioning:
        return self.family.encode_prompts(self.encoders, prompts, self.device)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels (N, 3, H, W) in [-1, 1] -> latent distribution (mean, std), each (N, C, H/f, W/f), unscaled."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def scale_latents(latents: torch.Tensor, spec) -> torch.Tensor:
    """Unscaled VAE latents -> the network's latents, as the pipelines do: (latent - shift_factor) * scaling_factor
    (SD3 / Flux VAEs have a shift; the UNet families' is 0). `spec`: the models.loading.ModelSpec. The one place
    latents are scaled (the cache stores them unscaled)."""
    return (latents - spec.vae_shift_factor) * spec.vae_scaling_factor


def unscale_latents(latents: torch.Tensor, spec) -> torch.Tensor:
    """The inverse of scale_latents: a pipeline's (the network's) latents -> unscaled VAE latents, what the cache
    stores (generate-pairs --write-cache)."""
    return latents / spec.vae_scaling_factor + spec.vae_shift_factor


def sample_latents(mean: torch.Tensor, std: torch.Tensor, spec, noise: Optional[torch.Tensor] = None,
                   mode: str = "sample") -> torch.Tensor:
    """Scaled latents from a stored distribution: mean + std * noise ('sample', as the official code's
    latent_dist.sample()) or the mean ('mean'); then shifted and scaled (scale_latents)."""
    if mode == "mean":
        return scale_latents(mean, spec)
    assert noise is not None, "sample mode needs a noise tensor"
    return scale_latents(mean + std * noise, spec)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    original_size, crop_top_left: (N, 2) -> (N, 6) float32. Uses the true original size and crop offset
    (the official DPO code uses a constant (res, res, 0, 0, res, res))."""
    target = torch.full_like(original_size, resolution)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


def pair_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int, mode: str,
                  indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDXL time ids of B pairs, (2B, 6) float32, winner rows then loser rows.

    original_size, crop_top_left: (B, 2, 2), [:, 0] winner, [:, 1] loser. mode 'pair' (data.sdxl_time_ids):
    the winner's row, repeated for the loser, so a pair differs only in its image (the transforms gave
    both one geometry; a pair whose rows differ raises DataError naming it). 'image': each image's own row."""
    if mode == "image":
        return torch.cat([sdxl_time_ids(original_size[:, j], crop_top_left[:, j], resolution) for j in (0, 1)])
    if mode != "pair":
        raise ValueError(f"sdxl time ids mode must be 'pair' or 'image', got {mode!r}")
    differ = (original_size[:, 0] != original_size[:, 1]).any(1) | (crop_top_left[:, 0] != crop_top_left[:, 1]).any(1)
    if differ.any():
        k = int(differ.nonzero()[0])
        name = f"pair {int(indices[k])}" if indices is not None else f"pair {k} of the batch"
        raise DataError(
            f"{name}: winner and loser have different sizes or crops (sizes {original_size[k].tolist()}, crops "
            f"{crop_top_left[k].tolist()}) but data.sdxl_time_ids=pair gives them one time-id row: this is a cache "
            "prepared with data.sdxl_time_ids=image; prepare one with 'pair' or set data.sdxl_time_ids=image")
    return sdxl_time_ids(original_size[:, 0], crop_top_left[:, 0], resolution).repeat(2, 1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM guidance-scale embedding (sinusoidal of (w - 1) * 1000), as LatentConsistencyModelPipeline computes it."""
    w = (w - 1.0) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.float()[:, None] * freq[None, :].to(w.device)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
