"""`diffusion-dpo generate-pairs`: sample K images per prompt, score them with a reward, write pairs.

    diffusion-dpo generate-pairs --base runwayml/stable-diffusion-v1-5 --prompts prompts.txt \\
        --images-per-prompt 4 --reward pickscore --strategy best-worst --margin 0.5 --out data/gen1 [--write-cache]

Multi-process: `accelerate launch --num_processes N $(which diffusion-dpo) generate-pairs ...`.
Rerun the same command after an interruption: finished chunks are kept. See docs/feedback.md.
"""

from __future__ import annotations

import argparse

from diffusion_dpo.commands.common import (add_feedback_arguments, add_generation_arguments, judge_from_args,
                                          sampling_overrides, this_process)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="pipeline to sample: diffusers folder or hub id (SD, SDXL, LCM)")
    parser.add_argument("--lora", default=None, help="LoRA folder loaded on the base")
    parser.add_argument("--unet", "--transformer", dest="unet", default=None,
                        help="tuned network folder replacing the base's (a UNet, or the SD3 / Flux transformer)")
    parser.add_argument("--out", required=True, help="output folder: images/, samples.jsonl, pairs.jsonl, generation.json")
    add_generation_arguments(parser)
    c = parser.add_argument_group("latent cache")
    c.add_argument("--write-cache", action="store_true",
                   help="also write OUT/cache, the pairs as a latent cache made from the sampled latents (no VAE "
                        "encoding); train with data.source=OUT/cache")
    c.add_argument("--cache-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage dtype of the cache's latents and text embeddings (default float16)")
    add_feedback_arguments(parser, default_chunk=8)


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.evaluate.prompts import load_prompts
    from diffusion_dpo.feedback.generate import describe, generate_pairs
    from diffusion_dpo.runtime import setup_logging

    setup_logging()
    process, device = this_process(args)
    prompts = load_prompts(args.prompts, cache_dir=args.prompt_cache).limit(args.limit)
    judge = judge_from_args(args, device)
    result = generate_pairs(args.base, prompts, args.out, judge, lora=args.lora, unet=args.unet,
                            images_per_prompt=args.images_per_prompt, strategy=args.strategy, margin=args.margin,
                            seed=args.seed, preset=args.preset, sample_batch_size=args.sample_batch_size,
                            chunk_size=args.chunk_size, device=device, dtype=args.dtype, dist=process,
                            progress=not args.no_progress, write_cache=args.write_cache,
                            cache_dtype=args.cache_dtype, **sampling_overrides(args))
    if result is not None:
        print(describe(result))
        if result.cache is not None:
            print(f"train on it with: data.source={result.cache} (or data.source={result.manifest} "
                  "data.format=manifest)")
        else:
            print(f"train on it with: data.source={result.manifest} data.format=manifest")
    return 0
