"""Flag groups that several commands share, and what turns those flags into library arguments.

- sampling (`sample`, `evaluate`): prompt set, seeds, and the sampler settings
- sampler settings (`sample`, `evaluate`, `generate-pairs`, `iterate`): preset, scheduler, steps, ...
- generation and pairing (`generate-pairs`, `iterate`)
- judge and resumable chunks (`label`, `generate-pairs`, `iterate`)
"""

from __future__ import annotations

import argparse
from typing import Any

from diffusion_dpo.evaluate.prompts import BUILTIN_SETS
from diffusion_dpo.evaluate.sampling import PRESETS, SCHEDULERS


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


def add_sampler_settings(g: Any) -> None:
    """Sampler flags shared by `sample`, `evaluate`, `generate-pairs` and `iterate` (`g`: a parser or group)."""
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="published settings: paper (default scheduler, 50 steps, guidance 7.5 SD / 5 SDXL), "
                        "drawbench-sd (DDIM 30 steps 512 px), drawbench-lcm (LCM 8 steps 768 px), model-card (the "
                        "checkpoint's card: SD3 Medium 28 steps / 7.0, SD3.5 Large 28 / 3.5, SD3.5 Medium 40 / 4.5, "
                        "FLUX.1-dev 50 / 3.5, FLUX.1-schnell 4, LCM 4 / 8.0; docs/evaluation.md); flags override")
    g.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="sampler (default: the pipeline's); SD3 / Flux take only default or flow_euler")
    g.add_argument("--steps", type=int, default=None, help="inference steps (default 50)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; Flux: the embedded guidance value of a guidance-distilled "
                        "checkpoint (FLUX.1-dev), refused for one without (schnell)")
    g.add_argument("--resolution", type=int, default=None, help="image height and width in pixels")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    g.add_argument("--sample-batch-size", type=int, default=4, help="images per pipeline call (does not change the noise)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    g.add_argument("--prompt-cache", default=None, help="cache folder for downloaded prompt sets "
                   "(default ~/.cache/diffusion_dpo/prompts)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampler flags as the `**overrides` of evaluate.sampling.resolve_settings."""
    return {"scheduler": args.scheduler, "steps": args.steps, "guidance": args.guidance,
            "resolution": args.resolution, "negative_prompt": args.negative_prompt}


def check_counts(args: argparse.Namespace) -> None:
    """The counts of add_sampling_arguments are in range."""
    from diffusion_dpo.errors import ConfigError

    if args.images_per_prompt < 1 or args.images_per_prompt > 100:
        raise ConfigError(f"--images-per-prompt must be between 1 and 100, got {args.images_per_prompt}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.sample_batch_size < 1:
        raise ConfigError(f"--sample-batch-size must be >= 1, got {args.sample_batch_size}")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampling and pairing flags shared by generate-pairs and iterate."""
    from diffusion_dpo.feedback.generate import STRATEGIES

    g = parser.add_argument_group("sampling and pairing")
    g.add_argument("--prompts", required=True, help="built-in prompt set name or a local .txt/.csv/.tsv/.json/.jsonl file")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--images-per-prompt", "-k", type=int, default=4, help="K images sampled per prompt (default 4)")
    g.add_argument("--strategy", choices=STRATEGIES, default="best-worst",
                   help="best-worst: one pair per prompt; all: every pair; random: K//2 disjoint random pairs; "
                        "all-ranked: every pair, with its rank difference recorded (Curriculum-DPO; train.curriculum)")
    g.add_argument("--margin", type=float, default=0.0,
                   help="keep a pair only if winner score - loser score >= this (default 0: any strict winner); "
                        "Curriculum-DPO: 0.02 for hpsv21 / text_alignment, 0.2 for aesthetic")
    g.add_argument("--seed", type=int, default=0, help="base seed; image i of prompt p uses image_seed(seed, p, i)")
    add_sampler_settings(g)


def add_feedback_arguments(parser: argparse.ArgumentParser, default_chunk: int) -> None:
    """The judge group (--reward/--weights/--reward-batch-size/--reward-dtype/--device), then --chunk-size and
    --no-progress: shared by label, generate-pairs and iterate."""
    g = parser.add_argument_group("judge")
    g.add_argument("--reward", action="append", required=True, metavar="SPEC",
                   help="reward model: a name (pickscore, pickscore_cosine, hpsv2, hpsv21, aesthetic, clip, "
                        "text_alignment, imagereward), name=LOCAL_PATH, or module:function (images, prompts) -> "
                        "scores; repeat for a weighted ensemble")
    g.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="comma-separated weight per --reward (default 1 each); the ensemble score is the weighted "
                        "sum of raw scores")
    g.add_argument("--reward-batch-size", type=int, default=None, help="images per reward call (default: the reward's)")
    g.add_argument("--reward-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    g.add_argument("--device", default=None, help="torch device (default: this process's accelerate device)")
    parser.add_argument("--chunk-size", type=int, default=default_chunk,
                        help=f"items per resumable chunk (default {default_chunk}); a rerun keeps the original size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def this_process(args: argparse.Namespace):
    """(runtime.ProcessInfo of this process, the torch device to use: --device or the process's own)."""
    from diffusion_dpo.runtime import ProcessInfo

    info = ProcessInfo.current()
    return info, args.device or str(info.device)


def judge_from_args(args: argparse.Namespace, device: str):
    """The Judge that the judge flags of add_feedback_arguments describe."""
    from diffusion_dpo.feedback.reward_judge import load_judge

    return load_judge(args.reward, args.weights, device=device, dtype=args.reward_dtype,
                      batch_size=args.reward_batch_size)
