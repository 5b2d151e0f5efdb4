"""The write side of the cache format (cache.store documents the layout and reads it): the key, shard files
and their metadata, the empty prompt's conditioning and the manifest, each written atomically (temp file,
fsync, rename: runtime.write_safetensors_atomic / write_json_atomic).

Both makers of caches write through it: `prepare` (cache.prepare, from a dataset's encoded images) and
`generate-pairs --write-cache` (feedback.generate, from the sampled latents).

    writer = CacheWriter(folder, inputs)          # inputs: what determines the tensors; writer.key hashes them
    writer.write_empty_prompt(tensors)
    table = PromptRows(prompts)                   # each distinct prompt once, pairs -> rows (table.index)
    manifest = writer.manifest(spec, pretrained, settings, source, num_source_pairs, shard_size, num_shards, done,
                               len(table.prompts), prompts_done)
    prompts_done[j] = writer.write_prompt_shard(j, text_tensors, start, table.prompts[start:stop])
    done[k] = writer.write_shard(k, tensors, start, stop, skipped)       # tensors hold prompt_index, no text
    writer.finish(manifest, done, prompts_done)   # shard index, counts and sizes, "complete": true

Safetensors headers are written with sorted keys, so the same tensors and metadata give the same bytes
(the library writes its metadata map in a random order per call): a resumed run writes an uninterrupted
run's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from diffusion_dpo.cache.store import (EMPTY_PROMPT, FORMAT_VERSION, MANIFEST, PROMPT_PREFIX, STORAGE_DTYPES,
                                       cache_key, shard_name)
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


class PromptRows:
    """The prompt table of a sequence of pair prompts: each distinct string once (exact match: no normalising),
    in order of first appearance, and each pair's row. Depends on the prompts alone, so every process of a
    launch, and a resumed run, computes the same table."""

    def __init__(self, pair_prompts: Sequence[str]):
        rows: dict[str, int] = {}
        self.index = [rows.setdefault(p, len(rows)) for p in pair_prompts]  # pair -> its prompt's row
        self.prompts = list(rows)  # row -> prompt
        self.rows = rows  # prompt -> row


def _row_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of one row of every tensor (a prompt's text conditioning, as stored)."""
    return sum(t[0].numel() * t.element_size() for t in tensors.values())


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
        """The text conditioning of "" (TextConditioning.tensors(), batch of 1), for caption dropout."""
        self._save(self.folder / EMPTY_PROMPT, tensors, {"key": self.key})

    def write_shard(self, k: int, tensors: dict[str, torch.Tensor], start: int, stop: int,
                    skipped: Iterable[int] = ()) -> dict[str, str]:
        """Shard k, holding the source pairs [start, stop) but `skipped`; returns its metadata."""
        skipped = list(skipped)
        meta = {"key": self.key, "start": str(start), "stop": str(stop), "kept": str(stop - start - len(skipped)),
                "skipped": json.dumps(skipped)}
        self._save(self.folder / shard_name(k), tensors, meta)
        return meta

    def write_prompt_shard(self, j: int, tensors: dict[str, torch.Tensor], start: int,
                           prompts: Sequence[str]) -> dict[str, str]:
        """Prompt-table file j: rows [start, start + len(prompts)) of every text field (TextConditioning.tensors()),
        row r being the conditioning of prompts[r - start] (named in the metadata); returns its metadata."""
        meta = {"key": self.key, "start": str(start), "stop": str(start + len(prompts)),
                "row_bytes": str(_row_bytes(tensors)), "prompts": json.dumps(list(prompts))}
        self._save(self.folder / shard_name(j, PROMPT_PREFIX), tensors, meta)
        return meta

    def shard_index(self, done: dict[int, dict[str, str]]) -> list[dict]:
        """The manifest's "shards": one entry per written shard (metadata as returned by write_shard)."""
        return [{"file": shard_name(k), "start": int(m["start"]), "stop": int(m["stop"]), "kept": int(m["kept"]),
                 "skipped": json.loads(m["skipped"]), "bytes": (self.folder / shard_name(k)).stat().st_size}
                for k, m in sorted(done.items())]

    def prompt_index(self, prompts_done: dict[int, dict[str, str]]) -> list[dict]:
        """The manifest's "prompt_shards": one entry per written prompt-table file (write_prompt_shard's metadata)."""
        return [{"file": shard_name(j, PROMPT_PREFIX), "start": int(m["start"]), "stop": int(m["stop"]),
                 "rows": int(m["stop"]) - int(m["start"]), "row_bytes": int(m["row_bytes"]),
                 "bytes": (self.folder / shard_name(j, PROMPT_PREFIX)).stat().st_size}
                for j, m in sorted(prompts_done.items())]

    def manifest(self, spec: Any, pretrained: str, settings: dict, source: dict, num_source_pairs: int,
                 shard_size: int, num_shards: int, done: dict[int, dict[str, str]], num_prompts: int,
                 prompts_done: dict[int, dict[str, str]]) -> dict:
        """A manifest not yet complete (shard index of `done` and `prompts_done`); write it with write_manifest.
        The prompt table has `num_prompts` rows in files of `shard_size` rows."""
        return {
            "format_version": FORMAT_VERSION, "key": self.key, "key_inputs": self.inputs, "complete": False,
            "model": {"pretrained": pretrained, "revision": spec.revision, "family": spec.family,
                      "latent_channels": spec.latent_channels, "vae_scaling_factor": spec.vae_scaling_factor},
            "settings": settings, "source": source, "num_source_pairs": num_source_pairs,
            "shard_size": shard_size, "num_shards": num_shards, "shards": self.shard_index(done),
            "num_prompts": num_prompts, "num_prompt_shards": -(-num_prompts // shard_size),
            "prompt_shards": self.prompt_index(prompts_done),
        }

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.folder / MANIFEST, manifest)

    def finish(self, manifest: dict, done: dict[int, dict[str, str]], prompts_done: dict[int, dict[str, str]]) -> dict:
        """Record every shard of `done` and `prompts_done` with the cache's counts and sizes and mark the manifest
        complete (written last).

        bytes: pair shards + prompt table. bytes_per_pair_without_dedup: what storing each pair's text with the
        pair (format 2) would have taken: the pair shards with a text row in place of each 8-byte prompt_index,
        and no prompt table."""
        manifest["shards"], manifest["prompt_shards"] = self.shard_index(done), self.prompt_index(prompts_done)
        kept = sum(s["kept"] for s in manifest["shards"])
        pair_bytes = sum(s["bytes"] for s in manifest["shards"])
        size = pair_bytes + sum(s["bytes"] for s in manifest["prompt_shards"])
        row_bytes = manifest["prompt_shards"][0]["row_bytes"] if manifest["prompt_shards"] else 0
        per_pair_text = pair_bytes + kept * (row_bytes - 8)  # a text row in each pair's place of its int64 prompt_index
        manifest.update(complete=True, num_pairs=kept, num_skipped=sum(len(s["skipped"]) for s in manifest["shards"]),
                        bytes=size, bytes_per_pair=round(size / max(kept, 1)),
                        bytes_per_pair_without_dedup=round(per_pair_text / max(kept, 1)),
                        pairs_per_prompt=round(kept / max(manifest["num_prompts"], 1), 2))
        self.write_manifest(manifest)
        return manifest
