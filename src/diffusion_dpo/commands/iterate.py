"""`diffusion-dpo iterate`: rounds of generate-pairs (sampled and judged), prepare and train.

    diffusion-dpo iterate --config configs/sd15_dpo.yaml --rounds 3 --prompts prompts.txt -k 4 \\
        --reward pickscore --out runs/online train.max_steps=200

Each round's tuned model becomes the next round's sampler and DPO reference (--no-update-reference
keeps the starting model). Rerun the same command to resume. See docs/feedback.md.
"""

from __future__ import annotations

import argparse

from diffusion_dpo.commands.common import (add_feedback_arguments, add_generation_arguments, judge_from_args,
                                          sampling_overrides, this_process)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="training YAML (model.pretrained = the starting model)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    parser.add_argument("--rounds", type=int, required=True, help="number of rounds R")
    parser.add_argument("--out", required=True, help="output folder; one round-NNN/ folder per round")
    parser.add_argument("--update-reference", action=argparse.BooleanOptionalAction, default=True,
                        help="fuse each round's result into a full pipeline that samples and serves as the DPO "
                             "reference of the next round (default on)")
    add_generation_arguments(parser)
    add_feedback_arguments(parser, default_chunk=8)


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.config import load_config
    from diffusion_dpo.evaluate.prompts import load_prompts
    from diffusion_dpo.feedback.iterate import iterate
    from diffusion_dpo.runtime import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    process, device = this_process(args)
    prompts = load_prompts(args.prompts, cache_dir=args.prompt_cache).limit(args.limit)
    judge = judge_from_args(args, device)
    records = iterate(cfg, prompts, judge, args.out, args.rounds, images_per_prompt=args.images_per_prompt,
                      strategy=args.strategy, margin=args.margin, seed=args.seed,
                      update_reference=args.update_reference, preset=args.preset,
                      sample_batch_size=args.sample_batch_size, chunk_size=args.chunk_size, device=device,
                      dtype=args.dtype, dist=process, progress=not args.no_progress, **sampling_overrides(args))
    if process.is_main:
        for rec in records:
            loss = rec["train_summary"].get("loss_last10")
            print(f"round {rec['round']}: {rec['num_pairs']} pairs, reference {rec['reference']}, "
                  f"loss (last 10) {loss if loss is None else f'{loss:.4f}'} -> {rec['result_model'] or rec['train_dir']}")
    return 0
