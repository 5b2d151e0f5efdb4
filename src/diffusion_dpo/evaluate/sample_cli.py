"""`diffusion-dpo sample`: images for a prompt set, a fixed seed per (prompt, image index), resumable.

    diffusion-dpo sample --prompts drawbench --base runwayml/stable-diffusion-v1-5 --lora out/lora \\
        --name dpo --out samples/ --images-per-prompt 10 --preset drawbench-sd
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffusion_dpo.evaluate.prompts import BUILTIN_SETS
from diffusion_dpo.evaluate.sampling import PRESETS, SCHEDULERS

log = logging.getLogger(__name__)


def add_sampling_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Flags shared by `sample` and `evaluate` (which can sample before scoring)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--prompts", required=required,
                   help=f"built-in prompt set ({', '.join(BUILTIN_SETS)}) or a local .txt/.csv/.tsv/.json/.jsonl file")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--seed", type=int, default=0,
                   help="base seed; image i of prompt p uses image_seed(seed, p, i) (docs/evaluation.md)")
    add_sampler_settings(g)


def add_sampler_settings(g) -> None:
    """Sampler flags shared by `sample`, `evaluate`, `generate-pairs` and `iterate`."""
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="published settings: paper (default scheduler, 50 steps, guidance 7.5 SD / 5 SDXL), "
                        "drawbench-sd (DDIM 30 steps 512 px), drawbench-lcm (LCM 8 steps 768 px); flags override")
    g.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the pipeline's)")
    g.add_argument("--steps", type=int, default=None, help="inference steps (default 50)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--resolution", type=int, default=None, help="image height and width in pixels")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    g.add_argument("--sample-batch-size", type=int, default=4, help="images per pipeline call (does not change the noise)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    g.add_argument("--prompt-cache", default=None, help="cache folder for downloaded prompt sets "
                   "(default ~/.cache/diffusion_dpo/prompts)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base pipeline: diffusers folder or hub id")
    parser.add_argument("--lora", default=None, help="LoRA folder to load on the base (pipe.load_lora_weights)")
    parser.add_argument("--unet", default=None, help="tuned UNet folder replacing the base UNet")
    parser.add_argument("--name", default=None,
                        help="model name = output subfolder (default: 'base', or the LoRA/UNet folder name)")
    parser.add_argument("--out", required=True, help="output folder; images go to OUT/NAME/")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampling_arguments(parser)


def sampling_overrides(args: argparse.Namespace) -> dict:
    return {"scheduler": args.scheduler, "steps": args.steps, "guidance": args.guidance,
            "resolution": args.resolution, "negative_prompt": args.negative_prompt}


def check_counts(args: argparse.Namespace) -> None:
    from diffusion_dpo.errors import ConfigError

    if args.images_per_prompt < 1 or args.images_per_prompt > 100:
        raise ConfigError(f"--images-per-prompt must be between 1 and 100, got {args.images_per_prompt}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.sample_batch_size < 1:
        raise ConfigError(f"--sample-batch-size must be >= 1, got {args.sample_batch_size}")


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.cli import setup_logging
    from diffusion_dpo.evaluate.prompts import load_prompts
    from diffusion_dpo.evaluate.sampling import ModelSpec, sample_model

    setup_logging()

    check_counts(args)
    name = args.name or (Path(args.lora or args.unet).name if (args.lora or args.unet) else "base")
    spec = ModelSpec(name=name, base=args.base, lora=args.lora, unet=args.unet)
    prompts = load_prompts(args.prompts, cache_dir=args.prompt_cache).limit(args.limit)
    result = sample_model(spec, prompts, args.out, preset=args.preset, images_per_prompt=args.images_per_prompt,
                          seed=args.seed, batch_size=args.sample_batch_size, device=args.device, dtype=args.dtype,
                          progress=not args.quiet, **sampling_overrides(args))
    print(f"{name}: {result.generated} images generated, {result.skipped} already on disk, in {result.folder}")
    return 0
