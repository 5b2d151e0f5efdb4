"""Encode a preference dataset once: VAE latent distributions of both images and the text conditioning of
each distinct prompt (the prompt table), written shard by shard into a cache keyed by exactly what determines
its contents.

    folder = prepare_cache(cfg, storage_dtype="float16")   # or: diffusion-dpo prepare --config run.yaml
    folder = ensure_cache(cfg)                              # prepare if missing or incomplete, else reuse

The encoders and transforms are the trainer's own (models.encode.PromptEncoder / encode_images,
data.transforms.PairTransform, data.dataset.decode_image), so with float32 storage and
data.latent_sampling=mean, training from the cache computes the same losses as encoding on the fly.

Two passes: the text encoder(s) over the prompt table (each distinct prompt once, rows in order of first
appearance over the source: cache.writer.PromptRows), then the VAE over the pairs, which store their prompt's
row. Resumable: shard k always covers source pairs [k*S, (k+1)*S), prompt-table file j rows [j*S, (j+1)*S); a
finished file is moved into place atomically and skipped on a rerun. Multi-process (`accelerate launch`):
process r encodes the files k with k % world_size == r of each pass; the main process writes the final manifest.
The table depends on the source's prompts alone, so every process computes the same one without talking.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffusion_dpo.cache.store import (EMPTY_PROMPT, MANIFEST, PROMPT_PREFIX, cache_key, completed_shards,
                                       read_manifest)
from diffusion_dpo.cache.writer import CacheWriter, PromptRows, storage_torch_dtype, versioned
from diffusion_dpo.config import RunConfig
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.models.families import family_of
from diffusion_dpo.runtime import ProcessInfo

log = logging.getLogger("diffusion_dpo")

MODEL_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
"""Pipeline subfolders whose files determine the cached tensors (the UNet does not)."""


def default_batch_size(device) -> int:
    """Pairs per encoder call when none is given. CPU: 1, measured (docs/performance.md, "What `prepare`
    costs"): the VAE's activations of 2 images stay in the processor's caches, those of 16 do not, and one pair
    per call cost 0.69x per pair what 8 pairs did, with identical tensors. GPU: 8, not measured (no GPU was
    lent); larger calls usually pay there."""
    return 1 if torch.device(device).type == "cpu" else 8


@dataclass
class PrepareTimes:
    """Where `prepare`'s time goes, in seconds, filled in as it runs (`prepare_cache(..., times=...)`)."""

    pairs: int = 0  # source pairs read, corrupt ones included
    images: float = 0.0  # waiting for decoded + transformed images (the DataLoader)
    vae: float = 0.0
    text: float = 0.0  # the prompt table (distinct prompts only)
    write: float = 0.0  # shard files and the manifest, fsync included
    seconds: float = 0.0  # wall time of the whole loop (the parts plus progress bar and bookkeeping)
    batches: list[float] = field(default_factory=list)  # seconds per pair of each batch of pairs: images + VAE

    def per_pair(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {"total": self.seconds / n, "images": self.images / n, "vae": self.vae / n, "text": self.text / n,
                "write": self.write / n}

    def median_per_pair(self) -> float:
        """Seconds per pair from the median batch plus the prompt table and the writes (shared out over the pairs):
        robust to a batch slowed by another process."""
        if not self.batches:
            return 0.0
        return sorted(self.batches)[len(self.batches) // 2] + (self.text + self.write) / max(self.pairs, 1)


def _wait(t: torch.Tensor) -> None:
    """Let the device finish, so a part's time is its own (CUDA runs asynchronously)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def folder_stats(root: Path, subfolders: tuple[str, ...] | None = None) -> list:
    """[relative path, size, mtime_ns] of every file that determines the encoders' outputs."""
    folders = [root / s for s in subfolders] if subfolders else [root]
    out = []
    for folder in folders:
        for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if p.is_file():
                st = p.stat()
                out.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def key_inputs(cfg: RunConfig, spec, data_fingerprint: str, storage_dtype: str) -> dict[str, Any]:
    """Exactly what determines the cached tensors: no more (batch size, beta, learning rate, latent
    sampling, workers ... are absent), no less."""
    m, d = cfg.model, cfg.data
    model: dict[str, Any] = {"pretrained": spec.pretrained, "revision": m.revision, "variant": m.variant,
                             "family": spec.family, "vae": m.vae}
    if Path(m.pretrained).is_dir():  # a local folder: its encoder files, not just its name
        model["pretrained"] = str(Path(m.pretrained).resolve())
        model["files"] = folder_stats(Path(m.pretrained), MODEL_PARTS)
    if m.vae and Path(m.vae).is_dir():
        model["vae"] = str(Path(m.vae).resolve())
        model["vae_files"] = folder_stats(Path(m.vae))
    random_crop = d.crop == "random"
    transforms = {
        "resolution": d.resolution, "crop": d.crop, "random_flip": d.random_flip,
        # shared draws and the seed only matter when something is drawn at prepare time
        "shared_transforms": d.shared_transforms if (random_crop or d.random_flip) else None,
        "seed": cfg.train.seed if random_crop else None,
    }
    if family_of(spec).size_conditioned:  # 'pair' resizes the loser to the winner's size (others: no time ids)
        transforms["sdxl_time_ids"] = d.sdxl_time_ids
    return versioned({"data": data_fingerprint, "model": model, "encoder_dtype": m.frozen_dtype,
                      "storage_dtype": storage_dtype, "transforms": transforms})


# ----------------------------------------------------------------------------------------------
# Items: decode + transform one pair (and its mirror image when flips are on)


class _PairItems(torch.utils.data.Dataset):
    def __init__(self, source, indices: range, transform, flip_variants: bool, seed: int, on_corrupt: str):
        self.source, self.indices, self.transform = source, indices, transform
        self.flip_variants, self.seed, self.on_corrupt = flip_variants, seed, on_corrupt

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        from PIL import Image

        from diffusion_dpo.data.dataset import item_seed, decode_pair

        i = self.indices[j]
        record = self.source[i]
        images = decode_pair(record, i, self.on_corrupt)
        if images is None:
            return {"index": i, "corrupt": True}
        img_w, img_l = images
        variants = [(img_w, img_l)]
        if self.flip_variants:
            mirror = Image.Transpose.FLIP_LEFT_RIGHT
            variants.append((img_w.transpose(mirror), img_l.transpose(mirror)))
        outs = []
        for a, b in variants:
            # the draws PairDataset makes for (seed, epoch 0, i): same crop for both variants
            outs.append(self.transform(a, b, torch.Generator().manual_seed(item_seed(self.seed, 0, i))))
        return {
            "index": i, "corrupt": False, "prompt": record.prompt,
            "pixels": torch.stack([o["pixel_values"] for o in outs]),  # (V, 2, 3, R, R)
            "original_size": outs[0]["original_size"],  # (2, 2)
            "crop_top_left": torch.stack([o["crop_top_left"] for o in outs]),  # (V, 2, 2)
        }


@dataclass
class Encoders:
    vae: Any
    prompt_encoder: Any


def load_encoders(cfg: RunConfig, spec, device) -> Encoders:
    """The frozen VAE and the family's prompt encoder (models/families/), as the trainer loads them."""
    from diffusion_dpo.runtime import torch_dtype

    family = family_of(spec)
    dtype = torch_dtype(cfg.model.frozen_dtype, "model.frozen_dtype")
    vae = family.load_vae(dtype, cfg.model.vae).to(device)
    return Encoders(vae, family.prompt_encoder(dtype, device))


def encode_prompts(prompts: list[str], enc: Encoders, batch_size: int, storage: torch.dtype,
                   times: Optional[PrepareTimes] = None) -> dict[str, torch.Tensor]:
    """The text conditioning of `prompts` (rows of the prompt table), `batch_size` prompts per encoder call."""
    times = times if times is not None else PrepareTimes()
    t = time.perf_counter()
    parts = []
    for start in range(0, len(prompts), batch_size):
        cond = enc.prompt_encoder(prompts[start:start + batch_size])
        parts.append({name: x.to("cpu", storage) for name, x in cond.tensors().items()})
    times.text += time.perf_counter() - t  # .to("cpu") waited for the device
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def encode_shard(items: _PairItems, enc: Encoders, batch_size: int, num_workers: int, storage: torch.dtype,
                 prompt_rows: dict[str, int], on_pairs: Callable[[int], None] = lambda n: None,
                 times: Optional[PrepareTimes] = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Encode one shard's pairs (their prompts' rows: `prompt_rows`); returns its tensors and the source indices
    of skipped (corrupt) pairs."""
    from diffusion_dpo.models.encode import encode_images

    times = times if times is not None else PrepareTimes()
    clock = time.perf_counter
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    batches = iter(loader)
    parts: dict[str, list[torch.Tensor]] = {}
    skipped: list[int] = []
    while True:
        t_batch = t = clock()
        batch = next(batches, None)
        times.images += clock() - t
        if batch is None:
            break
        kept = [it for it in batch if not it["corrupt"]]
        skipped += [it["index"] for it in batch if it["corrupt"]]
        if kept:
            pixels = torch.stack([it["pixels"] for it in kept])  # (b, V, 2, 3, R, R)
            b, v = pixels.shape[:2]
            t = clock()
            # VAE calls of batch_size pairs' images (2 per pair), flip variants included: on a CPU a larger call
            # costs more per image (docs/performance.md); the call size does not change the tensors (docs/cache.md)
            encoded = [encode_images(enc.vae, chunk) for chunk in pixels.flatten(0, 2).split(2 * batch_size)]
            mean = torch.cat([m for m, _ in encoded])  # (b*V*2, C, h, w), rows w, l per variant
            std = torch.cat([sd for _, sd in encoded])
            _wait(mean)
            times.vae += clock() - t
            new = {
                "source_index": torch.tensor([it["index"] for it in kept], dtype=torch.int64),
                "prompt_index": torch.tensor([prompt_rows[it["prompt"]] for it in kept], dtype=torch.int64),
                "latent_mean": mean.unflatten(0, (b, v, 2)).to("cpu", storage),
                "latent_std": std.unflatten(0, (b, v, 2)).to("cpu", storage),
                "original_size": torch.stack([it["original_size"] for it in kept]),
                "crop_top_left": torch.stack([it["crop_top_left"] for it in kept]),
            }
            for k, tensor in new.items():
                parts.setdefault(k, []).append(tensor)
        times.pairs += len(batch)
        times.batches.append((clock() - t_batch) / len(batch))
        on_pairs(len(batch))
    return {k: torch.cat(v) for k, v in parts.items()}, skipped


# ----------------------------------------------------------------------------------------------


def locate_cache(cfg: RunConfig, storage_dtype: str = "float16", cache_dir: Optional[str] = None):
    """(folder, key inputs, spec, source) of the cache that `cfg` describes; touches no image."""
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.models.families import detect_spec

    storage_torch_dtype(storage_dtype, "cache storage dtype")
    root = cache_dir or cfg.data.cache_dir
    if not root:
        raise ConfigError("no cache folder: set data.cache_dir (or pass --cache-dir to `diffusion-dpo prepare`)")
    m = cfg.model
    spec = detect_spec(m.pretrained, m.revision, m.variant, m.family, m.prediction_type)
    source = open_source(cfg.data)
    if source.labelled:
        raise ConfigError(f"{source.location} gives labelled single images (a labelled manifest or data.unpair), which "
                          "the latent cache does not store (it holds pairs): train on them without data.cache_dir")
    inputs = key_inputs(cfg, spec, source.fingerprint, storage_dtype)
    return Path(root) / cache_key(inputs), inputs, spec, source


def is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and bool(read_manifest(folder).get("complete"))


def prepare_cache(cfg: RunConfig, storage_dtype: str = "float16", batch_size: Optional[int] = None,
                  shard_size: int = 256, num_workers: int = 0, cache_dir: Optional[str] = None,
                  dist: Optional[ProcessInfo] = None, progress: bool = True,
                  times: Optional[PrepareTimes] = None) -> Path:
    """Write (or finish) the cache `cfg` describes and return its folder. Safe to interrupt at any moment.

    batch_size: pairs per encoder call (default: default_batch_size of the device); it does not change the
    tensors (except their last bits with one CPU thread and 16+ images per call: docs/cache.md).
    times: filled with where this process's time went (its own shards only)."""
    from tqdm.auto import tqdm

    from diffusion_dpo.data.transforms import PairTransform

    dist = dist or ProcessInfo()
    batch_size = batch_size or default_batch_size(dist.device)
    times = times if times is not None else PrepareTimes()
    folder, inputs, spec, source = locate_cache(cfg, storage_dtype, cache_dir)
    writer = CacheWriter(folder, inputs)
    key = writer.key  # == folder.name
    storage = storage_torch_dtype(storage_dtype, "cache storage dtype")
    if is_complete(folder):
        log.info("cache %s is complete: reusing it", folder)
        return folder
    d = cfg.data
    settings = {"resolution": d.resolution, "crop": d.crop, "random_flip": d.random_flip,
                "shared_transforms": d.shared_transforms, "seed": cfg.train.seed, "storage_dtype": storage_dtype,
                "encoder_dtype": cfg.model.frozen_dtype}
    if family_of(spec).size_conditioned:
        settings["sdxl_time_ids"] = d.sdxl_time_ids
    table = PromptRows(source.prompts())  # every process the same table: it depends on the prompts alone
    if dist.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        writer.remove_temp_files()  # half-written files of an interrupted run
        if (folder / MANIFEST).is_file():
            shard_size = read_manifest(folder)["shard_size"]  # keep the boundaries of the interrupted run
        manifest = writer.manifest(spec, spec.pretrained, settings, source.describe(), len(source), shard_size,
                                   -(-len(source) // shard_size), completed_shards(folder, key), len(table.prompts),
                                   completed_shards(folder, key, PROMPT_PREFIX))
        writer.write_manifest(manifest)
    dist.barrier()
    manifest = read_manifest(folder)
    shard_size, num_shards = manifest["shard_size"], manifest["num_shards"]

    enc = load_encoders(cfg, spec, dist.device)
    if dist.rank == 0 and not (folder / EMPTY_PROMPT).is_file():
        writer.write_empty_prompt({name: x.to("cpu", storage) for name, x in enc.prompt_encoder([""]).tensors().items()})

    t0 = time.perf_counter()
    rank_tag = f" [{dist.rank}]" if dist.world_size > 1 else ""
    # pass 1, the prompt table: the text encoder(s) on each distinct prompt once
    prompts_done = completed_shards(folder, key, PROMPT_PREFIX)
    todo = [j for j in range(manifest["num_prompt_shards"]) if j % dist.world_size == dist.rank and j not in prompts_done]
    bar = tqdm(total=sum(len(table.prompts[j * shard_size:(j + 1) * shard_size]) for j in todo),
               desc=f"prompts{rank_tag}", unit="prompt", disable=not progress or not todo, dynamic_ncols=True)
    for j in todo:
        start = j * shard_size
        prompts = table.prompts[start:start + shard_size]
        tensors = encode_prompts(prompts, enc, batch_size, storage, times)
        t_write = time.perf_counter()
        prompts_done[j] = writer.write_prompt_shard(j, tensors, start, prompts)
        if dist.rank == 0:
            manifest["prompt_shards"] = writer.prompt_index(prompts_done)
            writer.write_manifest(manifest)
        times.write += time.perf_counter() - t_write
        bar.update(len(prompts))
    bar.close()

    # pass 2, the pairs: the VAE on both images (and their mirror images), and each pair's prompt row
    done = completed_shards(folder, key)
    todo = [k for k in range(num_shards) if k % dist.world_size == dist.rank and k not in done]
    # flips are stored as mirrored variants (_PairItems), so the transform itself never flips
    transform = dataclasses.replace(PairTransform.from_config(d, family_of(spec).size_conditioned), random_flip=False)
    total = sum(min(shard_size, len(source) - k * shard_size) for k in todo)
    bar = tqdm(total=total, desc=f"prepare{rank_tag}", unit="pair", disable=not progress, dynamic_ncols=True)
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, len(source))
        items = _PairItems(source, range(start, stop), transform, d.random_flip, cfg.train.seed, d.on_corrupt)
        tensors, skipped = encode_shard(items, enc, batch_size, num_workers, storage, table.rows, bar.update, times)
        t_write = time.perf_counter()
        done[k] = writer.write_shard(k, tensors, start, stop, skipped)
        if dist.rank == 0:  # shard index, rewritten atomically after every shard
            manifest["shards"] = writer.shard_index(done)
            writer.write_manifest(manifest)
        times.write += time.perf_counter() - t_write
    bar.close()
    elapsed = time.perf_counter() - t0
    times.seconds += elapsed
    dist.barrier()
    if dist.rank == 0:
        done, prompts_done = completed_shards(folder, key), completed_shards(folder, key, PROMPT_PREFIX)
        missing = sorted(set(range(num_shards)) - set(done))
        missing_prompts = sorted(set(range(manifest["num_prompt_shards"])) - set(prompts_done))
        if missing or missing_prompts:
            raise RuntimeError(f"cache {folder}: shards {missing[:5]}, prompt-table files {missing_prompts[:5]} are "
                               "missing after every process finished")
        manifest = writer.finish(manifest, done, prompts_done)
        kept, skipped, size = manifest["num_pairs"], manifest["num_skipped"], manifest["bytes"]
        per = times.per_pair()
        breakdown = (f"; {per['total']:.3f} s/pair: images {per['images']:.3f}, VAE {per['vae']:.3f}, text "
                     f"{per['text']:.3f}, write {per['write']:.3f}; {batch_size} pair{'s' if batch_size > 1 else ''} "
                     "per encoder call") if total else ""
        print(f"prepared {total} pairs in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.2f} pairs/s"
              + (f" on process 0 of {dist.world_size}" if dist.world_size > 1 else "") + breakdown
              + f"); cache: {kept} pairs, "
              f"{skipped} corrupt skipped, {size / 2**20:.1f} MiB, {manifest['bytes_per_pair']} bytes/pair "
              f"({manifest['bytes_per_pair_without_dedup']} with each pair's text stored per pair; "
              f"{manifest['num_prompts']} distinct prompts, {manifest['pairs_per_prompt']} pairs per prompt) -> {folder}")
    dist.barrier()
    return folder


def ensure_cache(cfg: RunConfig, accelerator=None, storage_dtype: str = "float16") -> Path:
    """For `train` with data.cache_dir set: the cache folder of this config, prepared first if it is
    missing or incomplete (every process must call this; they share the encoding)."""
    dist = ProcessInfo.from_accelerate(accelerator) if accelerator is not None else None
    device = torch.device(dist.device if dist is not None else "cpu")
    # loading the encoders draws from the global RNG (random init before the weights are read): the trainer's
    # LoRA init and dropout must not depend on whether this run prepared the cache or found it
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        return prepare_cache(cfg, storage_dtype=storage_dtype, dist=dist,
                             progress=accelerator is None or accelerator.is_main_process)
