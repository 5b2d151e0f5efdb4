"""The write side of the cache format (cache.store documents the layout and reads it): the key, shard files
and their metadata, the empty prompt's conditioning and the manifest, each written atomically (temp file,
fsync, rename: runtime.write_safetensors_atomic / write_json_atomic).

Both makers of caches write through it: `prepare` (cache.prepare, from a dataset's encoded images) and
`generate-pairs --write-cache` (feedback.generate, from the sampled latents).

    writer = CacheWriter(folder, inputs)          # inputs: what determines the tensors; writer.key hashes them
    writer.write_empty_prompt(tensors)
    manifest = writer.manifest(spec, pretrained, settings, source, num_source_pairs, shard_size, num_shards, done)
    done[k] = writer.write_shard(k, tensors, start, stop, skipped)
    writer.finish(manifest, done)                 # shard index and counts, "complete": true

Safetensors headers are written with sorted keys, so the same tensors and metadata give the same bytes
(the library writes its metadata map in a random order per call): a resumed run writes an uninterrupted
run's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from diffusion_dpo.cache.store import (EMPTY_PROMPT, FORMAT_VERSION, MANIFEST, STORAGE_DTYPES, cache_key,
                                       shard_name)
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.runtime import remove_temp_files, write_json_atomic, write_safetensors_atomic


def storage_torch_dtype(name: str, what: str) -> torch.dtype:
    """The torch dtype a cache stores its tensors in, by its exact name (it is part of the key)."""
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"{what} must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def versioned(inputs: dict[str, Any]) -> dict[str, Any]:
    """Key inputs stamped with the format version (a new format never reuses an old cache)."""
    return {"format_version": FORMAT_VERSION, **inputs}


class CacheWriter:
    """Writes the files of the cache in `folder` whose key inputs are `inputs` (already versioned)."""

    def __init__(self, folder: str | Path, inputs: dict[str, Any]):
        self.folder = Path(folder)
        self.inputs = inputs
        self.key = cache_key(inputs)

    def remove_temp_files(self) -> None:
        """Delete half-written files of an interrupted run (only one process may call this)."""
        remove_temp_files(self.folder)

    def _save(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        write_safetensors_atomic(path, tensors, metadata, sorted_header=True)

    def write_empty_prompt(self, tensors: dict[str, torch.Tensor]) -> None:
        """prompt_embeds (1, L, D) [and pooled_prompt_embeds (1, D2)] of "", for caption dropout."""
        self._save(self.folder / EMPTY_PROMPT, tensors, {"key": self.key})

    def write_shard(self, k: int, tensors: dict[str, torch.Tensor], start: int, stop: int,
                    skipped: Iterable[int] = ()) -> dict[str, str]:
        """Shard k, holding the source pairs [start, stop) but `skipped`; returns its metadata."""
        skipped = list(skipped)
        meta = {"key": self.key, "start": str(start), "stop": str(stop), "kept": str(stop - start - len(skipped)),
                "skipped": json.dumps(skipped)}
        self._save(self.folder / shard_name(k), tensors, meta)
        return meta

    def shard_index(self, done: dict[int, dict[str, str]]) -> list[dict]:
        """The manifest's "shards": one entry per written shard (metadata as returned by write_shard)."""
        return [{"file": shard_name(k), "start": int(m["start"]), "stop": int(m["stop"]), "kept": int(m["kept"]),
                 "skipped": json.loads(m["skipped"]), "bytes": (self.folder / shard_name(k)).stat().st_size}
                for k, m in sorted(done.items())]

    def manifest(self, spec: Any, pretrained: str, settings: dict, source: dict, num_source_pairs: int,
                 shard_size: int, num_shards: int, done: dict[int, dict[str, str]]) -> dict:
        """A manifest not yet complete (shard index of `done`); write it with write_manifest."""
        return {
            "format_version": FORMAT_VERSION, "key": self.key, "key_inputs": self.inputs, "complete": False,
            "model": {"pretrained": pretrained, "revision": spec.revision, "family": spec.family,
                      "latent_channels": spec.latent_channels, "vae_scaling_factor": spec.vae_scaling_factor},
            "settings": settings, "source": source, "num_source_pairs": num_source_pairs,
            "shard_size": shard_size, "num_shards": num_shards, "shards": self.shard_index(done),
        }

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.folder / MANIFEST, manifest)

    def finish(self, manifest: dict, done: dict[int, dict[str, str]]) -> dict:
        """Record every shard of `done` with the cache's counts and mark the manifest complete (written last)."""
        manifest["shards"] = self.shard_index(done)
        kept = sum(s["kept"] for s in manifest["shards"])
        size = sum(s["bytes"] for s in manifest["shards"])
        manifest.update(complete=True, num_pairs=kept, num_skipped=sum(len(s["skipped"]) for s in manifest["shards"]),
                        bytes=size, bytes_per_pair=round(size / max(kept, 1)))
        self.write_manifest(manifest)
        return manifest
