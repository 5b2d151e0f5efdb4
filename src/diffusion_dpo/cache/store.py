"""The on-disk latent + text-embedding cache, and the dataset the trainer reads from it.

Layout of one cache (a folder named by its key, under `data.cache_dir`):

    <cache_dir>/<key>/
        cache_manifest.json          settings, key inputs, shard index, counts; "complete": true when done
        empty_prompt.safetensors     text conditioning of "" (caption dropout)
        shard-00000.safetensors      pairs [0, S) of the source, shard-00001 pairs [S, 2S), ...

Each shard holds, for the pairs of its source range that decoded (corrupt ones are listed in its metadata):

    source_index          int64 (n,)
    latent_mean/std       (n, V, 2, C, h, w)  VAE latent distribution, UNSCALED; [:, v, 0] chosen, [:, v, 1] rejected;
                          V = 2 when data.random_flip (v = 1 is the mirrored image), else 1
    prompt_embeds         (n, L, D); pooled_prompt_embeds (n, D2) for SDXL
    original_size         int64 (n, 2, 2)      (h, w) of each image before resizing (SDXL with data.sdxl_time_ids=pair:
                                               the winner's for both, the loser having been resized to it)
    crop_top_left         int64 (n, V, 2, 2)   crop offset of each image (per flip variant; one per pair in 'pair' mode)

This module is the read side (and the format's names); cache.writer is the write side, used by `prepare`
and `generate-pairs --write-cache` alike. Shards are written to a temporary file and moved into place with
os.replace, so a shard file either exists complete or not at all; shard boundaries depend only on the shard
size, so a cache finished after an interruption is identical to one written in one go.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.errors import DataError
from diffusion_dpo.runtime import DTYPES

FORMAT_VERSION = 2
"""2: resize rounds the long side down as torchvision does, and SDXL pairs share one geometry (data.sdxl_time_ids)."""
MANIFEST = "cache_manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
STORAGE_DTYPES = DTYPES
"""Storage dtypes by their exact names (no aliases: the name is part of the cache key)."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def cache_key(inputs: dict[str, Any]) -> str:
    """Hash of exactly the inputs that determine the cached tensors (see prepare.key_inputs)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder, MANIFEST)
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared cache (no {MANIFEST}); create one with `diffusion-dpo prepare`")
    return json.loads(path.read_text())


def shard_metadata(path: Path) -> dict[str, str]:
    """The metadata of a finished shard (start, stop, kept, skipped, key)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def completed_shards(folder: Path, key: str) -> dict[int, dict]:
    """{shard number: metadata} of the shard files in `folder` that belong to cache `key`."""
    done = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        meta = shard_metadata(path)
        if meta.get("key") == key:
            done[int(path.stem.split("-")[1])] = meta
    return done


# ----------------------------------------------------------------------------------------------
# Reading


def _same(name: str, cached, wanted) -> bool:
    if name == "pretrained" and Path(str(cached)).exists() and Path(str(wanted)).exists():
        return Path(cached).resolve() == Path(wanted).resolve()  # one folder, named relatively or absolutely
    return cached == wanted


@dataclass
class _Shard:
    path: Path
    offset: int  # cache position of the shard's first pair
    count: int


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs of a prepared cache, as the trainer consumes them (docs/architecture.md, "Cached batch").

    Item i is the i-th pair kept by `prepare` (corrupt pairs were dropped and counted there). Tensors are
    read lazily from the memory-mapped shards, so a cache larger than RAM trains fine.

    Flips: a cache prepared with data.random_flip stores every image and its mirror image; item i of epoch e
    picks, per image, the variant PairDataset would have drawn for (seed, e, i), so flips match on-the-fly
    training exactly (with center crops and no pairs skipped as corrupt, so that cache and source indices agree)."""

    def __init__(self, path: str | Path, spec, latent_sampling: str = "sample", seed: int = 0,
                 resolution: Optional[int] = None):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        if not m.get("complete"):
            raise DataError(f"cache {self.path} is incomplete ({len(m.get('shards', []))} of {m['num_shards']} shards "
                            "recorded): run `diffusion-dpo prepare` again with the same config; it continues where it stopped")
        if m["format_version"] != FORMAT_VERSION:
            raise DataError(f"cache {self.path} has format version {m['format_version']}, this toolkit reads "
                            f"{FORMAT_VERSION}: prepare it again (`diffusion-dpo prepare`, or `generate-pairs` for a "
                            "cache it wrote)")
        model = m["model"]
        mismatches = [f"model.{name}: cache {model[name]!r}, training config {getattr(spec, name)!r}"
                      for name in ("pretrained", "revision", "family")
                      if not _same(name, model[name], getattr(spec, name))]
        if resolution is not None and m["settings"]["resolution"] != resolution:
            mismatches.append(f"data.resolution: cache {m['settings']['resolution']}, training config {resolution}")
        if mismatches:
            raise DataError(f"cache {self.path} was prepared for a different model or resolution ("
                            + "; ".join(mismatches) + "): prepare a cache for this config with `diffusion-dpo prepare`")
        if latent_sampling not in ("sample", "mean"):
            raise ValueError(f"latent_sampling must be 'sample' or 'mean', got {latent_sampling!r}")
        self.latent_sampling = latent_sampling
        self.seed = seed
        self.epoch = 0
        self.flip_variants = bool(m["settings"]["random_flip"])
        self.shared_flips = bool(m["settings"]["shared_transforms"])
        self.shards: list[_Shard] = []
        offset = 0
        for entry in m["shards"]:
            self.shards.append(_Shard(self.path / entry["file"], offset, entry["kept"]))
            offset += entry["kept"]
        self._len = offset
        self._starts = torch.tensor([s.offset for s in self.shards], dtype=torch.long)
        self._open: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _handle(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a DataLoader worker: reopen the memory maps
            self._open, self._pid = {}, os.getpid()
        if k not in self._open:
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open)))
            self._open[k] = safe_open(str(self.shards[k].path), "pt")
        return self._open[k]

    def _flips(self, index: int) -> tuple[int, int]:
        """Flip variant of (chosen, rejected), drawn exactly as PairTransform draws it for this item."""
        from diffusion_dpo.data.dataset import item_seed

        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        draws = torch.rand(2, 3, generator=g, dtype=torch.float64)
        if self.shared_flips:
            draws[1] = draws[0]
        return int(draws[0, 2] < 0.5), int(draws[1, 2] < 0.5)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self._len:
            raise IndexError(f"pair {i} out of range for a cache of {self._len} pairs")
        k = int(torch.searchsorted(self._starts, torch.tensor(i), right=True)) - 1
        j = i - self.shards[k].offset
        f = self._handle(k)
        mean = f.get_slice("latent_mean")[j]  # (V, 2, C, h, w)
        std = f.get_slice("latent_std")[j]
        crops = f.get_slice("crop_top_left")[j]  # (V, 2, 2)
        v = self._flips(i) if self.flip_variants else (0, 0)
        item = {
            "latent_mean": torch.stack([mean[v[0], 0], mean[v[1], 1]]).float(),  # (2, C, h, w)
            "latent_std": torch.stack([std[v[0], 0], std[v[1], 1]]).float(),
            "prompt_embeds": f.get_slice("prompt_embeds")[j].float(),  # (L, D)
            "original_size": f.get_slice("original_size")[j],  # (2, 2)
            "crop_top_left": torch.stack([crops[v[0], 0], crops[v[1], 1]]),  # (2, 2)
            "index": i,
        }
        if "pooled_prompt_embeds" in f.keys():
            item["pooled_prompt_embeds"] = f.get_slice("pooled_prompt_embeds")[j].float()  # (D2,)
        return item

    def empty_conditioning(self):
        """Text conditioning of the empty prompt (batch of 1), for caption dropout."""
        from safetensors.torch import load_file

        from diffusion_dpo.models.encode import TextConditioning

        t = load_file(str(self.path / EMPTY_PROMPT))
        pooled = t["pooled_prompt_embeds"].float() if "pooled_prompt_embeds" in t else None
        return TextConditioning(t["prompt_embeds"].float(), pooled)


def collate_cached(items: list[Optional[dict]]) -> dict[str, Any]:
    """Stack CachedPairDataset items into the cached batch of docs/architecture.md."""
    kept = [it for it in items if it is not None]
    batch: dict[str, Any] = {"indices": torch.tensor([it["index"] for it in kept], dtype=torch.long),
                             "num_skipped": len(items) - len(kept)}
    if kept:
        for key in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "original_size", "crop_top_left"):
            if key in kept[0]:
                batch[key] = torch.stack([it[key] for it in kept])
    return batch
