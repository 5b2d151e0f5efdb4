"""`diffusion-dpo prepare --config FILE.yaml [section.key=value ...]`: encode a dataset into a latent cache.

Takes the same config as `train` (model, data, train.seed), so `train` with the same config and
data.cache_dir finds the cache by its key. With train.reference=cached it also computes the reference errors
of train.reference_epochs epochs beside the cache (docs/losses.md, "Reference strategies"). Multi-process: `accelerate launch --num_processes N
$(which diffusion-dpo) prepare ...` splits the shards across processes.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (the one you train with)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. data.resolution=512")
    p.add_argument("--cache-dir", help="where caches live (default: data.cache_dir); the cache is <dir>/<key>/")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of latents and text embeddings (default: data.cache_dtype, float16 unless set; "
                        "train finds the cache only with the same dtype)")
    p.add_argument("--batch-size", type=int,
                   help="pairs encoded per VAE / text-encoder call (default: 1 on a CPU, where larger calls cost more per "
                        "pair, measured in docs/performance.md; 8 on a GPU)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="pairs per shard file (default 256); an interrupted cache keeps the shard size it started with")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from diffusion_dpo.cache.prepare import prepare_cache
    from diffusion_dpo.config import load_config, reference_strategy
    from diffusion_dpo.errors import ConfigError
    from diffusion_dpo.runtime import ProcessInfo, setup_logging

    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    process = ProcessInfo.from_accelerate(PartialState())
    folder = prepare_cache(cfg, storage_dtype=args.dtype or cfg.data.cache_dtype, batch_size=args.batch_size,
                           shard_size=args.shard_size, num_workers=args.num_workers, cache_dir=args.cache_dir,
                           dist=process, progress=not args.no_progress and process.is_main)
    if reference_strategy(cfg.train) == "cached":
        from accelerate import Accelerator

        from diffusion_dpo.train.reference_cache import prepare_reference

        store = prepare_reference(cfg, folder, Accelerator(mixed_precision=cfg.train.mixed_precision),
                                  progress=not args.no_progress and process.is_main)
        if process.is_main:
            print(f"reference errors: {store.epochs} epochs x {store.errors.shape[1]} pairs -> {store.folder}")
    if process.is_main:
        print(f"train from it with: data.source={folder}  (or keep data.cache_dir={folder.parent} and the same config)")
    return 0
