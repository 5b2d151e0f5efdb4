"""`diffusion-dpo sample`: images for a prompt set, a fixed seed per (prompt, image index), resumable.

    diffusion-dpo sample --prompts drawbench --base runwayml/stable-diffusion-v1-5 --lora out/lora \\
        --name dpo --out samples/ --images-per-prompt 10 --preset drawbench-sd
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_dpo.commands.common import add_sampling_arguments, check_counts, sampling_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base pipeline: diffusers folder or hub id")
    parser.add_argument("--lora", default=None, help="LoRA folder to load on the base (pipe.load_lora_weights)")
    parser.add_argument("--unet", "--transformer", dest="unet", default=None,
                        help="tuned network folder replacing the base's: a UNet, or the SD3 / Flux transformer (the "
                             "folder itself or one holding unet/ or transformer/)")
    parser.add_argument("--name", default=None,
                        help="model name = output subfolder (default: 'base', or the LoRA/UNet folder name)")
    parser.add_argument("--out", required=True, help="output folder; images go to OUT/NAME/")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.evaluate.prompts import load_prompts
    from diffusion_dpo.evaluate.sampling import SampledModel, sample_model
    from diffusion_dpo.runtime import setup_logging

    setup_logging()

    check_counts(args)
    name = args.name or (Path(args.lora or args.unet).name if (args.lora or args.unet) else "base")
    model = SampledModel(name=name, base=args.base, lora=args.lora, unet=args.unet)
    prompts = load_prompts(args.prompts, cache_dir=args.prompt_cache).limit(args.limit)
    result = sample_model(model, prompts, args.out, preset=args.preset, images_per_prompt=args.images_per_prompt,
                          seed=args.seed, batch_size=args.sample_batch_size, device=args.device, dtype=args.dtype,
                          progress=not args.quiet, **sampling_overrides(args))
    print(f"{name}: {result.generated} images generated, {result.skipped} already on disk, in {result.folder}")
    return 0
