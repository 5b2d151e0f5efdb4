"""Labelled single images from data source to loss (Diffusion-KTO's unpaired data): the image counterpart of
train.batch's pairs, chosen once by train.batch.open_pairs when the source is labelled.

    images = LabelledImages(dataset, collate, stats)   # a labelled manifest, or pairs under data.unpair
    encoder = images.encoder(cfg, family, device)       # ImageEncoder: VAE + text encoders
    batch = encoder(raw)                                # -> LabelledBatch, each image's own seeded randomness
    errors = labelled_errors(policy, reference, family, scheduler, batch)   # train.step dispatches here

Each image is its own sample: its noise, timestep, caption-dropout coin and latent-sampling noise come from
models.diffusion.pair_generator(seed, epoch, image index), as a pair's do from its index, so resumed and
multi-process runs draw exactly what one uninterrupted process draws. The PairErrors handed to the loss hold
the desirable images as the w rows and the undesirable ones as the l rows (their counts may differ; either may
be empty in a micro-batch), which is what losses.kto reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from diffusion_dpo.config import RunConfig
from diffusion_dpo.losses import PairErrors
from diffusion_dpo.models.diffusion import per_sample_error
from diffusion_dpo.models.encode import TextConditioning, encode_images, sample_latents
from diffusion_dpo.runtime import torch_dtype


@dataclass
class LabelledBatch:
    """B encoded labelled images."""

    latents: torch.Tensor  # (B, C, h, w), already times the VAE scaling factor
    desirable: torch.Tensor  # bool (B,)
    cond: TextConditioning  # (B, L, D) [+ pooled (B, D2)]
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)
    pair_cond: Optional[torch.Tensor] = None  # family.pair_conditioning's winner rows (B, ...): SDXL time ids

    @property
    def size(self) -> int:
        return self.latents.shape[0]


class ImageEncoder:
    """Raw batch of labelled images (data.dataset.collate_images) -> LabelledBatch, encoded on the fly."""

    def __init__(self, cfg: RunConfig, family, device):
        self.cfg, self.family, self.device = cfg, family, device
        frozen = torch_dtype(cfg.model.frozen_dtype, "model.frozen_dtype")
        self.vae = family.load_vae(frozen, cfg.model.vae).to(device)
        self.prompt_encoder = family.prompt_encoder(frozen, device)
        self.empty_cond = self.prompt_encoder([""])

    def __call__(self, raw: dict[str, Any]) -> Optional[LabelledBatch]:
        """None when every image of the raw batch was dropped as corrupt."""
        if len(raw["indices"]) == 0:
            return None
        cfg, spec, res = self.cfg, self.family.spec, self.cfg.data.resolution
        # the family's own draws (a family may draw sigmas instead of timesteps); an image uses the winner's
        # latent-sampling noise
        rnd = self.family.draw_items(cfg, raw["epochs"], raw["indices"])
        mean, std = encode_images(self.vae, raw["pixel_values"].to(self.device))
        latents = sample_latents(mean, std, spec, rnd["latent_eps_w"].to(self.device),
                                 cfg.data.latent_sampling)
        cond = self.prompt_encoder(list(raw["prompts"]))
        if cfg.data.caption_dropout > 0:
            cond = cond.select(rnd["drop_caption"], self.empty_cond.to(self.device))
        # an image is conditioned as the winner of a pair of itself: the family's winner rows
        b = len(raw["indices"])
        as_pairs = {"original_size": raw["original_size"][:, None].repeat(1, 2, 1),
                    "crop_top_left": raw["crop_top_left"][:, None].repeat(1, 2, 1), "indices": raw["indices"]}
        pair_cond = self.family.pair_conditioning(as_pairs, res, cfg.data.sdxl_time_ids)
        return LabelledBatch(latents, raw["desirable"].to(self.device), cond, rnd["noise"].to(self.device),
                             rnd["timesteps"].to(self.device), None if pair_cond is None else pair_cond[:b].to(self.device))


@dataclass
class LabelledImages:
    """Labelled single images decoded from a source (a labelled manifest, or pairs under data.unpair)."""

    dataset: Any  # data.dataset.ImageDataset
    collate: Callable[[list], dict]
    source_stats: Optional[dict]
    labelled = True

    def encoder(self, cfg: RunConfig, family, device) -> ImageEncoder:
        return ImageEncoder(cfg, family, device)


def labelled_errors(policy, reference, family, scheduler, batch: LabelledBatch, reduction: str = "mean",
                    losers: bool = True, with_reference: bool = True, device=None) -> PairErrors:
    """Per-image errors of policy and (no grad) reference on each image's own noisy input, as PairErrors:
    w rows the desirable images, l rows the undesirable ones, in batch order. `losers` is pair_errors' switch
    and has no meaning here: every loss that takes labelled images reads both labels."""
    noisy, target = family.noisy_and_target(scheduler, batch.latents, batch.noise, batch.timesteps)
    device = batch.latents.device if device is None else device
    noisy, t, target = noisy.to(device), batch.timesteps.to(device), target.to(device)
    d, weight = batch.desirable.to(device), family.error_weight(t)
    ref_w = ref_l = None
    if with_reference:
        ref = per_sample_error(reference(lambda net: family.predict(net, noisy, t, batch.cond, batch.pair_cond),
                                         device), target, reduction, weight)
        ref_w, ref_l = ref[d], ref[~d]
    err = per_sample_error(family.predict(policy, noisy, t, batch.cond, batch.pair_cond), target, reduction, weight)
    return PairErrors(err[d], err[~d], ref_w, ref_l)
