"""`diffusion-dpo label`: re-judge a preference dataset with a reward model (AI feedback), before training.

    diffusion-dpo label --data pickapic/train-*.parquet --reward pickscore --out data/pickapic_pickscore
    diffusion-dpo train --config configs/sd15_dpo_ai_feedback.yaml

Multi-process: `accelerate launch --num_processes N $(which diffusion-dpo) label ...`. Rerun the same
command after an interruption: finished chunks are kept. See docs/feedback.md.
"""

from __future__ import annotations

import argparse


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """--reward/--weights/--reward-batch-size/--device/--reward-dtype, shared by label, generate-pairs, iterate."""
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


def judge_from_args(args: argparse.Namespace, device: str):
    """The Judge that the flags of add_judge_arguments describe."""
    from diffusion_dpo.feedback.reward_judge import load_judge

    return load_judge(args.reward, args.weights, device=device, dtype=args.reward_dtype,
                      batch_size=args.reward_batch_size)


def add_run_arguments(parser: argparse.ArgumentParser, default_chunk: int) -> None:
    parser.add_argument("--chunk-size", type=int, default=default_chunk,
                        help=f"items per resumable chunk (default {default_chunk}); a rerun keeps the original size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="dataset to relabel: Pick-a-Pic parquet file/glob/folder, saved datasets folder, hub id, "
                             "JSONL/CSV manifest or chosen/ + rejected/ folder pair (docs/data.md)")
    parser.add_argument("--format", default="auto", choices=["auto", "pickapic", "manifest", "folders"],
                        help="how to read --data (default: detect)")
    parser.add_argument("--split", default="train", help="split of a hub dataset or saved DatasetDict")
    parser.add_argument("--max-pairs", type=int, default=None, help="relabel only the first N pairs")
    parser.add_argument("--out", required=True, help="output folder: pairs.jsonl + images/ + label_summary.json")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="drop pairs whose score difference is below this (ties; counted); default 0: only exact ties")
    parser.add_argument("--on-corrupt", choices=["skip", "error"], default="skip",
                        help="an undecodable image: skip its pair and count it (default) or stop")
    add_judge_arguments(parser)
    add_run_arguments(parser, default_chunk=256)


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.cli import setup_logging

    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.feedback.chunks import distribution
    from diffusion_dpo.feedback.label import describe, label_pairs

    setup_logging()
    dist = distribution()
    # Ties in the ORIGINAL labels (Pick-a-Pic label_0 == 0.5) have no original winner: open_source drops and counts them.
    source = open_source(DataConfig(source=args.data, format=args.format, split=args.split, max_pairs=args.max_pairs,
                                    on_corrupt=args.on_corrupt))
    judge = judge_from_args(args, args.device or str(dist.device))
    result = label_pairs(source, judge, args.out, margin=args.margin, chunk_size=args.chunk_size,
                         on_corrupt=args.on_corrupt, dist=dist, progress=not args.no_progress)
    if result is not None:
        print(describe(result))
        print(f"train on it with: data.source={result.manifest} data.format=manifest")
    return 0
