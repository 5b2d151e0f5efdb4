"""`diffusion-dpo label`: re-judge a preference dataset with a reward model (AI feedback), before training.

    diffusion-dpo label --data pickapic/train-*.parquet --reward pickscore --out data/pickapic_pickscore
    diffusion-dpo train --config configs/sd15_dpo_ai_feedback.yaml

Multi-process: `accelerate launch --num_processes N $(which diffusion-dpo) label ...`. Rerun the same
command after an interruption: finished chunks are kept. See docs/feedback.md.
"""

from __future__ import annotations

import argparse

from diffusion_dpo.commands.common import add_feedback_arguments, judge_from_args, this_process


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
    add_feedback_arguments(parser, default_chunk=256)


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.feedback.label import describe, label_pairs
    from diffusion_dpo.runtime import setup_logging

    setup_logging()
    process, device = this_process(args)
    # Ties in the ORIGINAL labels (Pick-a-Pic label_0 == 0.5) have no original winner: open_source drops and counts them.
    source = open_source(DataConfig(source=args.data, format=args.format, split=args.split, max_pairs=args.max_pairs,
                                    on_corrupt=args.on_corrupt))
    judge = judge_from_args(args, device)
    result = label_pairs(source, judge, args.out, margin=args.margin, chunk_size=args.chunk_size,
                         on_corrupt=args.on_corrupt, dist=process, progress=not args.no_progress)
    if result is not None:
        print(describe(result))
        print(f"train on it with: data.source={result.manifest} data.format=manifest")
    return 0
