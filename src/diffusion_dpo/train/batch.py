"""One batch contract behind one encoder: whatever the data source, the step receives a PairBatch.

    pairs = open_pairs(cfg, family, accelerator)    # PixelPairs (images + prompts) or CachedPairs (a prepared cache)
    encoder = pairs.encoder(cfg, family, device)     # PixelEncoder (VAE + text encoders) or CachedEncoder (no model)
    batch = encoder(raw)                             # -> PairBatch, with each pair's own seeded randomness

Both encoders share everything after "latent distribution + text conditioning" (PairEncoder.__call__), so a
cache prepared in float32 and read with data.latent_sampling=mean gives the batches encoding on the fly gives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffusion_dpo.config import RunConfig
from diffusion_dpo.errors import DataError
from diffusion_dpo.models.encode import TextConditioning, encode_images, sample_latents
from diffusion_dpo.runtime import torch_dtype


@dataclass
class PairBatch:
    """B encoded preference pairs. Winner first everywhere a pair is stacked."""

    latents_w: torch.Tensor  # (B, C, h, w), already shifted and scaled (models.encode.scale_latents)
    latents_l: torch.Tensor  # (B, C, h, w)
    cond: TextConditioning  # (B, L, D) [+ pooled (B, D2)]: one text conditioning per pair
    noise: torch.Tensor  # (B, C, h, w): one noise per pair
    timesteps: torch.Tensor  # (B,): one timestep per pair
    pair_cond: Optional[torch.Tensor] = None  # family.pair_conditioning rows (2B, ...): SDXL time ids (2B, 6) float32
    ref_errors: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (B,) winner, (B,) loser: train.reference=cached
    pref_prob: Optional[torch.Tensor] = None  # (B,) probability that w is preferred: loss.soft_labels

    @property
    def size(self) -> int:
        return self.latents_w.shape[0]


class PairEncoder(ABC):
    """Raw batch -> PairBatch. Subclasses say where the latent distributions and the text come from."""

    pref_prob: Optional[torch.Tensor] = None  # (N,) per source index, loss.soft_labels (PixelEncoder's argument)

    def __init__(self, cfg: RunConfig, family, device, empty_cond: TextConditioning):
        self.cfg, self.family, self.device = cfg, family, device
        self.empty_cond = empty_cond  # text conditioning of "" (batch of 1), for caption dropout

    @abstractmethod
    def distributions_and_text(self, raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, TextConditioning]:
        """Latent distribution (mean, std), each (B, 2, C, h, w) unscaled, [:, 0] winner; text conditioning (B, ...)."""

    def __call__(self, raw: dict[str, Any]) -> Optional[PairBatch]:
        """None when every pair of the raw batch was dropped as corrupt."""
        cfg, spec = self.cfg, self.family.spec
        if len(raw["indices"]) == 0:
            return None
        res = cfg.data.resolution
        rnd = self.family.draw_items(cfg, raw["epochs"], raw["indices"])
        mean, std, cond = self.distributions_and_text(raw)
        mode = cfg.data.latent_sampling
        lat_w = sample_latents(mean[:, 0], std[:, 0], spec, rnd["latent_eps_w"].to(self.device), mode)
        lat_l = sample_latents(mean[:, 1], std[:, 1], spec, rnd["latent_eps_l"].to(self.device), mode)
        if cfg.data.caption_dropout > 0:
            cond = cond.select(rnd["drop_caption"], self.empty_cond.to(self.device))
        pair_cond = self.family.pair_conditioning(raw, res, cfg.data.sdxl_time_ids)
        pref_prob = None if self.pref_prob is None else self.pref_prob[raw["indices"]].to(self.device)
        return PairBatch(lat_w, lat_l, cond, rnd["noise"].to(self.device), rnd["timesteps"].to(self.device),
                         None if pair_cond is None else pair_cond.to(self.device), pref_prob=pref_prob)


class PixelEncoder(PairEncoder):
    """Images and prompts encoded on the fly by the frozen VAE and the family's text encoders."""

    def __init__(self, cfg: RunConfig, family, device, pref_prob: Optional[torch.Tensor] = None):
        frozen = torch_dtype(cfg.model.frozen_dtype, "model.frozen_dtype")
        self.pref_prob = pref_prob
        self.vae = family.load_vae(frozen, cfg.model.vae).to(device)
        self.prompt_encoder = family.prompt_encoder(frozen, device)
        super().__init__(cfg, family, device, self.prompt_encoder([""]))

    def distributions_and_text(self, raw):
        pixels = raw["pixel_values"].to(self.device)  # (B, 2, 3, R, R)
        b = pixels.shape[0]
        mean, std = encode_images(self.vae, pixels.flatten(0, 1))  # (2B, C, h, w), rows w0,l0,w1,l1,...
        return mean.unflatten(0, (b, 2)), std.unflatten(0, (b, 2)), self.prompt_encoder(list(raw["prompts"]))


class CachedEncoder(PairEncoder):
    """Latent distributions and text conditioning read from a prepared cache: no model in memory."""

    def __init__(self, cfg: RunConfig, family, device, dataset):
        super().__init__(cfg, family, device, dataset.empty_conditioning())

    def distributions_and_text(self, raw):
        cond = TextConditioning.from_tensors(raw).to(self.device)  # the text fields of the cached batch
        return raw["latent_mean"].to(self.device), raw["latent_std"].to(self.device), cond


class EpochItems(torch.utils.data.Dataset):
    """Adapts a dataset indexed by int to items addressed as (epoch, index), so random transforms
    are seeded per epoch and per pair. With `epoch_period` E (train.reference=cached), epoch e draws as epoch
    e mod E: the per-pair randomness repeats after the E epochs whose reference errors were stored."""

    def __init__(self, dataset, epoch_period: Optional[int] = None):
        self.dataset = dataset
        self.epoch_period = epoch_period

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if self.epoch_period is not None:
            epoch %= self.epoch_period
        self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        if item is not None:
            item["epoch"] = epoch
        return item


def with_epochs(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    """`collate`, plus the batch's `epochs` (int64 (B,)) for the per-pair generators."""

    def collate_with_epochs(items):
        batch = collate(items)
        batch["epochs"] = torch.tensor([it["epoch"] for it in items if it is not None], dtype=torch.long)
        return batch

    return collate_with_epochs


@dataclass
class PixelPairs:
    """Pairs decoded and transformed from a data source (data.format = a source format)."""

    dataset: Any  # data.dataset.PairDataset
    collate: Callable[[list], dict]
    source_stats: Optional[dict]  # the source's counts, for check_fills_batch's message
    pref_prob: Optional[torch.Tensor] = None  # (N,) per source index: loss.soft_labels (data.soft_labels module)
    labelled = False  # pairs, not labelled single images (train.singles.LabelledImages)

    def encoder(self, cfg: RunConfig, family, device) -> PairEncoder:
        return PixelEncoder(cfg, family, device, self.pref_prob)


@dataclass
class CachedPairs:
    """Pairs of a prepared cache (data.format=cache, or data.cache_dir)."""

    dataset: Any  # cache.store.CachedPairDataset
    collate: Callable[[list], dict]
    source_stats: Optional[dict] = None
    labelled = False

    def encoder(self, cfg: RunConfig, family, device) -> PairEncoder:
        return CachedEncoder(cfg, family, device, self.dataset)


def open_pairs(cfg: RunConfig, family, accelerator=None):
    """The run's pairs: a prepared cache (no VAE, no text encoder in memory) or images encoded on the fly; or
    labelled single images (train.singles.LabelledImages) from a labelled source or under data.unpair. Pairs for
    train.method=consistency_dpo are encoded with its frozen teacher (train.consistency.ConsistencyPairs)."""
    pairs = _open_source_pairs(cfg, family, accelerator)
    if cfg.train.method == "consistency_dpo" and not pairs.labelled:  # labelled data: losses.check_data refuses it
        from diffusion_dpo.train.consistency import ConsistencyPairs

        return ConsistencyPairs(pairs)
    return pairs


def _open_source_pairs(cfg: RunConfig, family, accelerator=None):
    d, spec = cfg.data, family.spec
    cache_folder = None
    prepared = d.format == "cache" or (d.format == "auto" and Path(d.source, "cache_manifest.json").is_file())
    if cfg.loss.soft_labels and (prepared or d.cache_dir):
        raise DataError("loss.soft_labels=true cannot read a prepared latent cache (it keeps no pref_prob or margin "
                        "column): point data.source to the pairs' manifest and remove data.cache_dir")
    if prepared:
        if d.unpair:
            raise DataError(f"data.unpair=true cannot read the prepared cache {d.source} (it stores pairs); point "
                            "data.source to the pairs' images instead")
        cache_folder = d.source
    elif d.cache_dir:  # prepared on the fly once (or found complete) and reused by every later run
        from diffusion_dpo.cache.prepare import ensure_cache

        cache_folder = ensure_cache(cfg, accelerator, storage_dtype=d.cache_dtype)
    if cache_folder is not None:
        from diffusion_dpo.cache.store import CachedPairDataset, collate_cached

        dataset = CachedPairDataset(cache_folder, spec, d.latent_sampling, seed=cfg.train.seed, resolution=d.resolution)
        return CachedPairs(dataset, with_epochs(collate_cached))
    from diffusion_dpo.data.dataset import PairDataset, collate_pairs
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform

    source = open_source(d)  # logs what it read, ties dropped and missing files
    transform = PairTransform.from_config(d, family.size_conditioned)
    if source.labelled:
        from diffusion_dpo.data.dataset import ImageDataset, collate_images
        from diffusion_dpo.train.singles import LabelledImages

        images = ImageDataset(source, transform, seed=cfg.train.seed, on_corrupt=d.on_corrupt)
        return LabelledImages(images, with_epochs(collate_images), source.stats)
    dataset = PairDataset(source, transform, seed=cfg.train.seed, on_corrupt=d.on_corrupt)
    pref_prob = None
    if cfg.loss.soft_labels:  # before any model loads: data without the column fails fast
        from diffusion_dpo.data.soft_labels import preference_probabilities

        pref_prob = preference_probabilities(source, cfg.loss.soft_label_temperature or 1.0)
    return PixelPairs(dataset, with_epochs(collate_pairs), source.stats, pref_prob)
