"""The on-disk latent + text-embedding cache, and the dataset the trainer reads from it.

Layout of one cache (a folder named by its key, under `data.cache_dir`), format 3:

    <cache_dir>/<key>/
        cache_manifest.json          settings, key inputs, shard and prompt-table index, counts; "complete": true when done
        empty_prompt.safetensors     text conditioning of "" (caption dropout)
        prompts-00000.safetensors    the prompt table: rows [0, S) of the source's distinct prompts, prompts-00001 [S, 2S), ...
        shard-00000.safetensors      pairs [0, S) of the source, shard-00001 pairs [S, 2S), ...

The prompt table holds each distinct prompt string of the source once, in order of first appearance over the
source's pairs (corrupt pairs included, so the order is known before any image is decoded): one row per prompt
of every TextConditioning field the family fills (models.encode.TEXT_FIELDS: prompt_embeds (p, L, D), and
pooled_prompt_embeds (p, D2) for SDXL; SD3/Flux fill the same two). Its files' metadata name their rows' prompts.

Each shard holds, for the pairs of its source range that decoded (corrupt ones are listed in its metadata):

    source_index          int64 (n,)
    prompt_index          int64 (n,)              the pair's row of the prompt table
    latent_mean/std       (n, V, 2, C, h, w)  VAE latent distribution, UNSCALED; [:, v, 0] chosen, [:, v, 1] rejected;
                          V = 2 when data.random_flip (v = 1 is the mirrored image), else 1
    original_size         int64 (n, 2, 2)      (h, w) of each image before resizing (SDXL with data.sdxl_time_ids=pair:
                                               the winner's for both, the loser having been resized to it)
    crop_top_left         int64 (n, V, 2, 2)   crop offset of each image (per flip variant; one per pair in 'pair' mode)

Format 2 (still read) stored the text fields in the shards, one row per pair, instead of prompt_index and the
prompt table. Readers see one per-pair view of both (CachedPairDataset items, read_shard).

This module is the read side (and the format's names); cache.writer is the write side, used by `prepare`
and `generate-pairs --write-cache` alike. Files are written to a temporary file and moved into place with
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
from diffusion_dpo.models.encode import TEXT_FIELDS, TextConditioning
from diffusion_dpo.runtime import DTYPES

FORMAT_VERSION = 3
"""2: resize rounds the long side down as torchvision does, and SDXL pairs share one geometry (data.sdxl_time_ids).
3: each distinct prompt's text conditioning is stored once, in the prompt table, and pairs refer to its rows."""
READABLE_VERSIONS = (2, 3)
"""Format 2 holds the same tensors with the text repeated per pair: still read as it is. Format 1 is refused."""
MANIFEST = "cache_manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
STORAGE_DTYPES = DTYPES
"""Storage dtypes by their exact names (no aliases: the name is part of the cache key)."""
SHARD_PREFIX, PROMPT_PREFIX = "shard", "prompts"


def shard_name(k: int, prefix: str = SHARD_PREFIX) -> str:
    """File of pair shard k (or, with prefix PROMPT_PREFIX, of prompt-table shard k)."""
    return f"{prefix}-{k:05d}.safetensors"


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


def completed_shards(folder: Path, key: str, prefix: str = SHARD_PREFIX) -> dict[int, dict]:
    """{shard number: metadata} of the shard files (prefix PROMPT_PREFIX: prompt-table files) in `folder` that
    belong to cache `key`."""
    done = {}
    for path in sorted(folder.glob(f"{prefix}-*.safetensors")):
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


def check_readable(folder: Path, manifest: dict) -> None:
    """A complete cache of a format this toolkit reads, whose files are all there; else one DataError with the fix."""
    if not manifest.get("complete"):
        raise DataError(f"cache {folder} is incomplete ({len(manifest.get('shards', []))} of {manifest['num_shards']} "
                        "shards recorded): run `diffusion-dpo prepare` again with the same config; it continues where "
                        "it stopped")
    if manifest["format_version"] not in READABLE_VERSIONS:
        raise DataError(f"cache {folder} has format version {manifest['format_version']}, this toolkit reads "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}: prepare it again (`diffusion-dpo prepare`, or "
                        "`generate-pairs` for a cache it wrote)")
    missing = [e["file"] for e in manifest["shards"] + manifest.get("prompt_shards", [])
               if not (folder / e["file"]).is_file()]
    if missing:
        raise DataError(f"cache {folder} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (files its "
                        "manifest lists): prepare it again (`diffusion-dpo prepare` with the same config, after "
                        "deleting the folder)")


class _OpenFiles:
    """Memory-mapped safetensors files by path, at most `limit` open; reopened in a forked DataLoader worker."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._open: dict[Path, Any] = {}
        self._pid = os.getpid()

    def __call__(self, path: Path):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a DataLoader worker: reopen the memory maps
            self._open, self._pid = {}, os.getpid()
        if path not in self._open:
            if len(self._open) >= self.limit:
                self._open.pop(next(iter(self._open)))
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path]


@dataclass
class _Shard:
    path: Path
    offset: int  # cache position of the shard's first pair (prompt table: its first row)
    count: int


def _shards(folder: Path, entries: list[dict], count: str) -> tuple[list[_Shard], torch.Tensor]:
    """The manifest's shard `entries` with their first positions (`count`: each entry's number of rows)."""
    shards, offset = [], 0
    for entry in entries:
        shards.append(_Shard(folder / entry["file"], offset, entry[count]))
        offset += entry[count]
    return shards, torch.tensor([s.offset for s in shards], dtype=torch.long)


class PromptTable:
    """The prompt table of a format-3 cache: row r -> the text fields of its prompt, read from memory-mapped files."""

    def __init__(self, folder: Path, entries: list[dict], files: _OpenFiles):
        self.shards, self._starts = _shards(folder, entries, "rows")
        self._files = files

    def row(self, r: int) -> dict[str, torch.Tensor]:
        k = int(torch.searchsorted(self._starts, torch.tensor(r), right=True)) - 1
        f = self._files(self.shards[k].path)
        return {name: f.get_slice(name)[r - self.shards[k].offset] for name in f.keys()}  # only text fields


def text_of_pair(f, j: int, prompts: Optional[PromptTable]) -> dict[str, torch.Tensor]:
    """The text fields of pair j of an open shard `f`: its prompt-table row (format 3) or its own (format 2)."""
    if prompts is None:
        return {name: f.get_slice(name)[j] for name in TEXT_FIELDS if name in f.keys()}
    return prompts.row(int(f.get_slice("prompt_index")[j]))


def read_shard(folder: str | Path, k: int) -> dict[str, torch.Tensor]:
    """Pair shard k as per-pair tensors in the storage dtype, the prompt table's rows put in each pair's place:
    the tensors a format-2 shard held (for tools that take a shard whole: bench, the golden tests)."""
    folder = Path(folder)
    m = read_manifest(folder)
    check_readable(folder, m)
    files = _OpenFiles()
    prompts = PromptTable(folder, m["prompt_shards"], files) if m["format_version"] >= 3 else None
    f = files(folder / m["shards"][k]["file"])
    out = {name: f.get_tensor(name) for name in f.keys() if name != "prompt_index" and name not in TEXT_FIELDS}
    rows = [text_of_pair(f, j, prompts) for j in range(m["shards"][k]["kept"])]
    out.update({name: torch.stack([r[name] for r in rows]) for name in (rows[0] if rows else {})})
    return out


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs of a prepared cache, as the trainer consumes them (docs/architecture.md, "Cached batch").

    Item i is the i-th pair kept by `prepare` (corrupt pairs were dropped and counted there). Tensors are
    read lazily from the memory-mapped shards and prompt table, so a cache larger than RAM trains fine.

    Flips: a cache prepared with data.random_flip stores every image and its mirror image; item i of epoch e
    picks, per image, the variant PairDataset would have drawn for (seed, e, i), so flips match on-the-fly
    training exactly (with center crops and no pairs skipped as corrupt, so that cache and source indices agree)."""

    def __init__(self, path: str | Path, spec, latent_sampling: str = "sample", seed: int = 0,
                 resolution: Optional[int] = None):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        check_readable(self.path, m)
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
        self._files = _OpenFiles()
        self.shards, self._starts = _shards(self.path, m["shards"], "kept")
        self._len = sum(s.count for s in self.shards)
        self.prompts = PromptTable(self.path, m["prompt_shards"], self._files) if m["format_version"] >= 3 else None

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        f = self._files(self.shards[k].path)
        mean = f.get_slice("latent_mean")[j]  # (V, 2, C, h, w)
        std = f.get_slice("latent_std")[j]
        crops = f.get_slice("crop_top_left")[j]  # (V, 2, 2)
        v = self._flips(i) if self.flip_variants else (0, 0)
        item = {
            "latent_mean": torch.stack([mean[v[0], 0], mean[v[1], 1]]).float(),  # (2, C, h, w)
            "latent_std": torch.stack([std[v[0], 0], std[v[1], 1]]).float(),
            "original_size": f.get_slice("original_size")[j],  # (2, 2)
            "crop_top_left": torch.stack([crops[v[0], 0], crops[v[1], 1]]),  # (2, 2)
            "index": i,
        }
        # prompt_embeds (L, D) [, pooled_prompt_embeds (D2,)]: the pair's prompt-table row
        item.update({name: t.float() for name, t in text_of_pair(f, j, self.prompts).items()})
        return item

    def empty_conditioning(self) -> TextConditioning:
        """Text conditioning of the empty prompt (batch of 1), for caption dropout."""
        from safetensors.torch import load_file

        return TextConditioning.from_tensors({k: t.float() for k, t in load_file(str(self.path / EMPTY_PROMPT)).items()})


def collate_cached(items: list[Optional[dict]]) -> dict[str, Any]:
    """Stack CachedPairDataset items into the cached batch of docs/architecture.md."""
    kept = [it for it in items if it is not None]
    batch: dict[str, Any] = {"indices": torch.tensor([it["index"] for it in kept], dtype=torch.long),
                             "num_skipped": len(items) - len(kept)}
    if kept:
        for key in ("latent_mean", "latent_std", "original_size", "crop_top_left", *TEXT_FIELDS):
            if key in kept[0]:
                batch[key] = torch.stack([it[key] for it in kept])
    return batch
