"""`diffusion-dpo train --config FILE.yaml [section.key=value ...]`"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see configs/); optional if every key is given as an override")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides applied after the file, e.g. train.beta=5000 lora.rank=16")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (keys that depend "
                   "on the detected model family, such as lora.target_modules, print as null)")
    p.epilog = ("lora.target_modules default: the detected family's set (train.method=consistency_dpo: the LCM-LoRA "
                "set); table in docs/recipes.md, \"LoRA targets\". output.dir/config.yaml records the list trained.")
    p.add_argument("--check-launch", metavar="ACCELERATE_CONFIG",
                   help="check that `accelerate launch --config_file ACCELERATE_CONFIG` can run train here "
                        "(deepspeed installed for zero2.yaml / zero3.yaml) and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from diffusion_dpo.config import load_config, to_dict
    from diffusion_dpo.runtime import setup_logging
    from diffusion_dpo.train.trainer import train

    if args.check_launch:
        from diffusion_dpo.train.engine import check_launch

        print(f"{args.check_launch}: {check_launch(args.check_launch)} can be launched here")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    setup_logging()
    try:
        summary = train(cfg)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the folder every output goes to
            err.filename = cfg.output.dir
        raise
    print("training finished: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in summary.items()))
    print(f"outputs in {cfg.output.dir}")
    return 0
