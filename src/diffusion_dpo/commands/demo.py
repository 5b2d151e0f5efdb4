"""`diffusion-dpo demo`: build or load the miniature base, generate and judge pairs, prepare the cache,
train Diffusion-DPO and an SFT baseline, evaluate all three on held-out prompts, and summarise.

    diffusion-dpo demo --output-dir demo_out          # about 3 minutes on 2 CPU cores (docs/demo.md)
    diffusion-dpo demo --quick --output-dir /tmp/q    # the reduced run of the test suite
    diffusion-dpo demo --compare-losses --output-dir compare_out   # every loss, 3 seeds (docs/losses.md)
    diffusion-dpo demo --compare-curriculum --output-dir curriculum_out   # Curriculum-DPO vs DPO (docs/curriculum.md)
    diffusion-dpo demo --distill-lcm --output-dir lcm_out          # a miniature LCM + Consistency-DPO (docs/demo.md)

Every stage resumes when interrupted: run the same command again.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="demo_out",
                        help="where every stage writes (pairs/, cache/, dpo/, sft/, samples/, results.json, "
                             "report.html, grid.png); rerunning the same command resumes there")
    parser.add_argument("--seed", type=int, default=0, help="seed of pair sampling, training and evaluation noise")
    parser.add_argument("--base", default=None, help="a demo base pipeline folder (default: the shipped one)")
    parser.add_argument("--rebuild-base", action="store_true",
                        help="pretrain the base from scratch first (about 15-20 minutes on 2 cores; into --base, "
                             "default ~/.cache/diffusion_dpo/demo_base)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run for tests: fewer prompts, images and steps (still shows the direction)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of DPO and SFT (default: 200, "
                        "quick: 100)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--compare-losses", action="store_true",
                        help="train every loss (--losses) on the demo world with the demo DPO's pairs and budget for "
                             "each of --seeds, tune each loss's main setting on seed 0, and write comparison.md/json "
                             "and grid_seed<s>.png (docs/losses.md); resumes like the demo")
    parser.add_argument("--compare-curriculum", action="store_true",
                        help="make reward-ranked pairs (generate-pairs --strategy all-ranked) on the demo world and "
                             "train DPO and Curriculum-DPO from them with the same step budget for each of --seeds; "
                             "write comparison.md/json and grid_seed<s>.png (docs/curriculum.md); resumes like the demo")
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="--compare-curriculum: the first N train prompts (default 54; not with --quick)")
    parser.add_argument("--pair-images", type=int, default=None,
                        help="--compare-curriculum: K images per train prompt (default 6; not with --quick)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="--compare-curriculum: images per held-out prompt (default 4)")
    parser.add_argument("--distill-lcm", action="store_true",
                        help="distil a miniature latent consistency model from the base (--distill-steps), compare its "
                             "few-step samples with the base's, and train Consistency-DPO on it for each of --seeds "
                             "(docs/demo.md); resumes like the demo")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="--distill-lcm: distillation steps (default 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="--compare-losses / --compare-curriculum: seeds (default 0 1 2); --distill-lcm: seeds of "
                             "Consistency-DPO "
                             "(default 0)")
    parser.add_argument("--report-only", action="store_true",
                        help="--compare-losses / --compare-curriculum: train nothing, write the table from the runs "
                             "finished so far")
    parser.add_argument("--losses", nargs="+", default=None,
                        help="--compare-losses: losses to train (default: every loss; dpo always runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace):
    from diffusion_dpo.demo.run import DemoSettings, quick_settings

    s = quick_settings(args.output_dir, args.seed) if args.quick else DemoSettings(output_dir=args.output_dir,
                                                                                   seed=args.seed)
    s = replace(s, base=args.base, rebuild_base=args.rebuild_base, threads=args.threads,
                progress=not args.no_progress)
    if args.rebuild_base and args.base is None:
        from diffusion_dpo.demo.base import default_build_dir

        s = replace(s, base=str(default_build_dir()))
    if args.steps is not None:
        if args.steps < 1:
            from diffusion_dpo.errors import ConfigError

            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        s = replace(s, train_steps=args.steps)
    return s


def compare_settings_from_args(args: argparse.Namespace):
    from diffusion_dpo.demo.compare import CompareSettings, default_losses

    s = settings_from_args(args)  # validates --steps as for the demo
    return CompareSettings(output_dir=args.output_dir, seeds=args.seeds or [0, 1, 2],
                           losses=args.losses or default_losses(),
                           quick=args.quick, train_steps=args.steps, threads=args.threads, progress=s.progress,
                           report_only=args.report_only)


def curriculum_settings_from_args(args: argparse.Namespace):
    from diffusion_dpo.demo.curriculum_compare import CurriculumCompareSettings

    s = settings_from_args(args)  # validates --steps as for the demo
    given = {"train_steps": args.steps, "train_prompts": args.train_prompts, "pair_images": args.pair_images,
             "eval_images": args.eval_images}
    return CurriculumCompareSettings(output_dir=args.output_dir, seeds=args.seeds or [0, 1, 2], quick=args.quick,
                                     threads=args.threads, progress=s.progress, report_only=args.report_only,
                                     **{k: v for k, v in given.items() if v is not None})  # else the comparison's own


def lcm_settings_from_args(args: argparse.Namespace):
    from diffusion_dpo.demo.lcm import LCMDemoSettings, quick_lcm_settings

    s = settings_from_args(args)  # validates --steps as for the demo
    lcm = quick_lcm_settings(args.output_dir) if args.quick else LCMDemoSettings(output_dir=args.output_dir)
    lcm = replace(lcm, seeds=args.seeds or [0], base=args.base, threads=args.threads, progress=s.progress)
    if args.steps is not None:
        lcm = replace(lcm, train_steps=args.steps)
    if args.distill_steps is not None:
        if args.distill_steps < 1:
            from diffusion_dpo.errors import ConfigError

            raise ConfigError(f"--distill-steps must be >= 1, got {args.distill_steps}")
        lcm = replace(lcm, distill_steps=args.distill_steps)
    return lcm


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.demo.run import run_demo
    from diffusion_dpo.errors import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    modes = [flag for flag, on in (("--compare-losses", args.compare_losses),
                                   ("--compare-curriculum", args.compare_curriculum),
                                   ("--distill-lcm", args.distill_lcm)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} are separate runs: run one, each into its own --output-dir")
    if args.losses is not None and not args.compare_losses:
        raise ConfigError("--losses belongs to --compare-losses; add it, or remove --losses")
    if args.report_only and not (args.compare_losses or args.compare_curriculum):
        raise ConfigError("--report-only belongs to --compare-losses and --compare-curriculum; add one, or remove it")
    if any(x is not None for x in (args.train_prompts, args.pair_images, args.eval_images)) and not args.compare_curriculum:
        raise ConfigError("--train-prompts, --pair-images and --eval-images belong to --compare-curriculum; add it")
    if args.distill_steps is not None and not args.distill_lcm:
        raise ConfigError("--distill-steps belongs to --distill-lcm; add it")
    if args.compare_curriculum:
        from diffusion_dpo.demo.curriculum_compare import compare_curriculum

        return 0 if compare_curriculum(curriculum_settings_from_args(args))["rows"] else 1
    if args.compare_losses:
        from diffusion_dpo.demo.compare import compare_losses

        return 0 if compare_losses(compare_settings_from_args(args))["rows"] else 1
    if args.distill_lcm:
        from diffusion_dpo.demo.lcm import run_lcm_demo

        return 0 if run_lcm_demo(lcm_settings_from_args(args)) else 1
    if args.seeds is not None:
        raise ConfigError("--seeds belongs to --compare-losses, --compare-curriculum and --distill-lcm; add one, or use "
                          "--seed for one demo run")
    results = run_demo(settings_from_args(args))
    return 0 if results else 1
