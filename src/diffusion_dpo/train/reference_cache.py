"""train.reference=cached: the reference's per-sample errors of every cache pair, computed once before training.

    store = ensure_reference(cfg, family, scheduler, pairs, autocast, dist)   # computes the missing epochs
    batch.ref_errors = store.lookup(raw["epochs"], raw["indices"])             # the trainer, per micro-batch

The errors are those the live reference forward computes in the step (train.step.reference_errors, the same
function), on the same inputs: the cache's latents, the caption-dropout coin, latent-sampling noise, noise and
timestep of (train.seed, epoch, index) drawn by the training encoder (CachedEncoder), for epochs
0..train.reference_epochs-1. They are keyed (reference_key_inputs) by exactly what decides them and stored beside
the latent cache (cache.reference_store); docs/losses.md "Reference strategies" says what this changes.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffusion_dpo.cache.prepare import folder_stats
from diffusion_dpo.cache.reference_store import (REFERENCE_FORMAT, ReferenceStore, ReferenceWriter, epoch_name,
                                                 part_name, read_part, reference_folder)
from diffusion_dpo.config import RunConfig
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.runtime import ProcessInfo, torch_dtype
from diffusion_dpo.train.batch import CachedEncoder, CachedPairs, EpochItems
from diffusion_dpo.train.pair_order import PairOrder
from diffusion_dpo.train.step import reference_errors

log = logging.getLogger("diffusion_dpo")

NETWORK_PARTS = ("unet", "scheduler")
"""Pipeline subfolders whose files decide the reference's errors (the latent cache's key covers the encoders)."""


def reference_dtype_name(cfg: RunConfig) -> str:
    """The dtype the reference computes in: LoRA's base network is in model.frozen_dtype, a full fine-tune's
    frozen copy in model.reference_dtype (default model.frozen_dtype)."""
    m = cfg.model
    return m.frozen_dtype if cfg.train.finetune == "lora" else (m.reference_dtype or m.frozen_dtype)


def reference_key_inputs(cfg: RunConfig, family, cache_key: str) -> dict[str, Any]:
    """Exactly what decides the stored errors: the reference network, the cache's tensors (its key), the per-pair
    randomness (seed, timestep range, caption dropout, latent sampling) and how errors are computed. Not the epoch
    count (one file per epoch), batch size, beta, learning rate or the loss."""
    m, t, d, spec = cfg.model, cfg.train, cfg.data, family.spec
    model: dict[str, Any] = {"pretrained": spec.pretrained, "revision": m.revision, "variant": m.variant,
                             "family": spec.family, "prediction_type": spec.prediction_type}
    if Path(m.pretrained).is_dir():  # a local folder: its network files, not just its name
        model["pretrained"] = str(Path(m.pretrained).resolve())
        model["files"] = folder_stats(Path(m.pretrained), NETWORK_PARTS)
    if spec.time_cond_proj_dim is not None:  # guidance-embedding networks (LCM) read model.lcm_guidance_scale
        model["guidance_scale"] = m.lcm_guidance_scale
    lo, hi = t.timestep_range
    return {"format_version": REFERENCE_FORMAT, "cache": cache_key, "model": model,
            "reference_dtype": reference_dtype_name(cfg), "mixed_precision": t.mixed_precision, "seed": t.seed,
            "timestep_range": [lo, min(hi, spec.num_train_timesteps)], "caption_dropout": d.caption_dropout,
            "latent_sampling": d.latent_sampling, "error_reduction": t.error_reduction,
            "sdxl_time_ids": d.sdxl_time_ids if family.size_conditioned else None, **family.draw_settings()}


def ensure_reference(cfg: RunConfig, family, scheduler, pairs, autocast: Callable[[], Any] = contextlib.nullcontext,
                     dist: Optional[ProcessInfo] = None, progress: bool = True) -> ReferenceStore:
    """The store of this config's reference errors for train.reference_epochs epochs, computing the epochs that
    are missing (every process must call this; each computes a slice of the pairs, the main process merges)."""
    if not isinstance(pairs, CachedPairs):
        raise ConfigError("train.reference=cached needs a prepared latent cache (the errors are stored beside it): set "
                          "data.cache_dir (prepared on first use) or data.source to a cache folder, or use "
                          "train.reference=live")
    dist = dist or ProcessInfo()
    dataset = pairs.dataset
    inputs = reference_key_inputs(cfg, family, dataset.manifest["key"])
    folder = reference_folder(dataset.path, inputs)
    writer = ReferenceWriter(folder, inputs, len(dataset))
    epochs = cfg.train.reference_epochs
    todo = [e for e in range(epochs) if not (folder / epoch_name(e)).is_file()]
    dist.barrier()  # every process has looked before the main one writes
    if todo:
        if dist.is_main:
            writer.start()
        dist.barrier()
        # loading the network draws from the global RNG (its random init before the weights are read): the
        # trainer's LoRA init and dropout must not depend on whether the reference was computed in this run
        cuda = [torch.device(dist.device).index or 0] if torch.device(dist.device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            _compute(cfg, family, scheduler, pairs, writer, todo, autocast, dist, progress)
    else:
        log.info("reference errors: reusing %s (%d epochs)", folder, epochs)
    return ReferenceStore(folder, writer.key, epochs, len(dataset))


def _compute(cfg: RunConfig, family, scheduler, pairs, writer: ReferenceWriter, todo: list[int], autocast,
             dist: ProcessInfo, progress: bool) -> None:
    """Reference forwards over every pair for each epoch of `todo`, through the training encoder and
    train.step.reference_errors, in the micro-batches training forms in that epoch (train.pair_order: the epoch's
    permutation cut into train.batch_size pairs, whatever the process count), so a run with this batch size gets
    the errors its live reference forward would compute, bit for bit. Process r takes micro-batches k % W == r."""
    from tqdm.auto import tqdm

    n, bs = writer.num_pairs, cfg.train.batch_size
    dtype = torch_dtype(reference_dtype_name(cfg), "model.reference_dtype")
    unet = family.load_network(torch.float32).to(dtype).to(dist.device).requires_grad_(False)
    encoder = CachedEncoder(cfg, family, dist.device, pairs.dataset)
    items = EpochItems(pairs.dataset)
    mine = lambda chunks: chunks[dist.rank::dist.world_size]  # noqa: E731
    total = sum(len(c) for c in mine(torch.arange(n).split(bs))) * len(todo)
    bar = tqdm(total=total, desc="reference errors", unit="pair", disable=not progress, dynamic_ncols=True)
    for e in todo:
        order = PairOrder(n, 1, cfg.train.seed).order(e)  # the trainer's permutation of epoch e
        indices, rows = [], []
        for chunk in mine(order.split(bs)):
            batch = encoder(pairs.collate([items[(e, int(i))] for i in chunk]))
            with torch.no_grad(), autocast():
                w, l = reference_errors(lambda predict, device: predict(unet), family, scheduler, batch,
                                        cfg.train.error_reduction)
            indices.append(chunk)
            rows.append(torch.stack([w, l], dim=1).float().cpu())  # (b, 2)
            bar.update(len(chunk))
        found = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        errors = torch.cat(rows) if rows else torch.zeros(0, 2)
        if dist.world_size == 1:
            writer.write(epoch_name(e), torch.zeros(n, 2).index_copy_(0, found, errors), e)
            continue
        writer.write(part_name(e, dist.rank), errors, e, found)
        dist.barrier()
        if dist.is_main:  # scatter every process's rows into one file
            merged = torch.zeros(n, 2)
            parts = [writer.folder / part_name(e, r) for r in range(dist.world_size)]
            for p in parts:
                part_indices, part_errors = read_part(p)
                merged.index_copy_(0, part_indices, part_errors)
            writer.write(epoch_name(e), merged, e)
            for p in parts:
                p.unlink()
        dist.barrier()
    bar.close()
    log.info("reference errors: %d epochs of %d pairs computed -> %s", len(todo), n, writer.folder)


def prepare_reference(cfg: RunConfig, cache_folder: Path, accelerator, progress: bool = True) -> ReferenceStore:
    """`diffusion-dpo prepare` with train.reference=cached: the store for the cache just prepared."""
    from diffusion_dpo.cache.store import CachedPairDataset, collate_cached
    from diffusion_dpo.models.families import detect_spec, family_of
    from diffusion_dpo.train.batch import with_epochs

    m = cfg.model
    spec = detect_spec(m.pretrained, m.revision, m.variant, m.family, m.prediction_type)
    family = family_of(spec, m.lcm_guidance_scale, cfg.flow)
    scheduler = family.load_noise_scheduler(accelerator.device)
    dataset = CachedPairDataset(cache_folder, spec, cfg.data.latent_sampling, seed=cfg.train.seed,
                                resolution=cfg.data.resolution)
    return ensure_reference(cfg, family, scheduler, CachedPairs(dataset, with_epochs(collate_cached)),
                            accelerator.autocast, ProcessInfo.from_accelerate(accelerator), progress)
