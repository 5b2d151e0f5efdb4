"""`diffusion-dpo plan --config FILE.yaml [overrides] --world-size N --device-memory 80GiB [--arch A] [--json FILE]
[--measure]`: per-device memory and step FLOPs of a training config, which engine fits, which to use.

Flags and printing only; the planner is the library package diffusion_dpo.plan (docs/scaling.md, "Planning
memory")."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from diffusion_dpo.models.arch_configs import ARCHS

_UNITS = {"": 2**30, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="the training config (YAML) to plan; optional if every key is an override")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides applied after the file, as for `train` (e.g. train.batch_size=4)")
    p.add_argument("--world-size", type=int, default=1, help="devices (processes) training together (default 1)")
    p.add_argument("--device-memory", default="80GiB",
                   help="memory of one device, e.g. 80GiB, 24GiB or 80GB (GB = 10^9 bytes, GiB = 2^30; a bare "
                        "number is GiB; default 80GiB: an 80 GB A100/H100)")
    p.add_argument("--arch", choices=ARCHS,
                   help="plan a named real architecture from its published configs (models/arch_configs.py) instead "
                        "of model.pretrained's folder; set data.resolution to its size (1024 for all but sd15)")
    p.add_argument("--json", metavar="FILE",
                   help="write the plan as JSON to FILE ('-': to stdout, instead of the table)")
    p.add_argument("--measure", action="store_true",
                   help="also run 3 real training steps of the config on this CPU and print the measured peak beside "
                        "the estimate (needs model.pretrained and data.source to exist; slow for real sizes)")


def parse_memory(text: str) -> int:
    """'80GiB' / '80GB' / '80' (GiB) -> bytes."""
    from diffusion_dpo.errors import ConfigError

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--device-memory {text!r}: give a positive size with a unit, e.g. 80GiB, 24GiB or 80GB")
    return int(float(match.group(1)) * _UNITS[unit])


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.config import load_config
    from diffusion_dpo.errors import ConfigError
    from diffusion_dpo.plan import make_plan

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    device_bytes = parse_memory(args.device_memory)
    cfg = load_config(args.config, args.overrides)
    if args.measure and args.arch:
        raise ConfigError("--measure runs the config's own model: drop --arch (published configs have no weights to "
                          "run) or drop --measure")
    if not args.arch and not cfg.model.pretrained:
        raise ConfigError("plan needs a model: set model.pretrained to a local pipeline folder, or pass --arch "
                          f"({', '.join(ARCHS)})")
    plan = make_plan(cfg, args.world_size, device_bytes, arch=args.arch)
    if args.measure:
        from diffusion_dpo.plan.measure import measure_peak

        measured = measure_peak(cfg)
        plan["measured"] = {**measured, "estimate_over_measured": plan["single_device"]["peak"] / measured["peak"]}
    if args.json == "-":
        print(json.dumps(plan, indent=1))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1))
    print(format_plan(plan))
    return 0


def format_plan(plan: dict) -> str:
    """The plan as a table a person reads at a glance."""
    s, single = plan["setup"], plan["single_device"]
    n = plan["world_size"]
    unit, unit_name = (2**30, "GiB") if single["peak"] >= 2**30 else (2**20, "MiB")  # tiny test models: MiB

    def size(nbytes: float) -> str:
        return f"{nbytes / unit:8.2f}"

    def count(k: int) -> str:
        return f"{k / 1e9:.2f}B" if k >= 1e9 else f"{k / 1e6:.1f}M"

    lines = [f"plan: {s['model']}: {s['network_class']}, {count(s['parameters']['network'])} parameters "
             f"({count(s['parameters']['trainable'])} trained: {s['finetune']}), reference: {s['reference']}",
             f"      {s['resolution']} px, {s['batch_size']} pair(s) per device, {s['optimizer']}, mixed precision "
             f"{s['mixed_precision']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
             f"images {'encoded in the step' if s['encodes_on_the_fly'] else 'from a cache'}",
             f"one device, no sharding (two steps simulated on fake tensors), {unit_name}:"]
    names = {"policy_trainable": "trained weights", "policy_frozen": "frozen weights (LoRA base, buffers)",
             "reference": "reference copy", "encoders": "VAE + text encoders", "gradients": "gradients (at the peak)",
             "optimizer": "optimizer state (at the peak)", "activations": "activations + temporaries (at the peak)"}
    lines += [f"  {names[k]:<42}{size(v)}" for k, v in single["at_peak"].items()]
    lines.append(f"  {'peak':<42}{size(single['peak'])}")
    if "measured" in plan:
        m = plan["measured"]
        lines.append(f"  {'measured on this CPU (' + str(m['steps']) + ' real steps)':<42}{size(m['peak'])}   "
                     f"estimate / measured = {m['estimate_over_measured']:.3f}")
    lines.append(f"step: {plan['flops']['per_device_step'] / 1e12:.2f} TFLOP per device per micro-batch as run; "
                 f"{plan['flops']['per_optimizer_step'] / 1e12:.2f} TFLOP per optimizer step on {n} device(s)")
    lines.append(f"engines on {n} device(s) of {plan['device_memory'] / 2**30:.2f} GiB (fits: estimate x "
                 f"{1 + plan['allocator_margin']:.2f} + {plan['context_bytes'] / 2**30:.0f} GiB context <= device):")
    lines.append(f"  {'engine':<15}{unit_name + '/device':>10}  {'fits':<5} launch (configs/accelerate/)")
    lines += [f"  {r['engine']:<15}{size(r['bytes_per_device']):>10}  {'yes' if r['fits'] else 'no':<5} {r['config']}"
              for r in plan["engines"]]
    best = plan["recommended"]
    lines.append(f"recommended: {best['engine']} ({best['config']})" if best else
                 "recommended: none fits; try train.gradient_checkpointing=true, a smaller train.batch_size (with "
                 "train.gradient_accumulation), train.finetune=lora, model.frozen_dtype=bfloat16, "
                 "train.reference=cached, or more devices")
    return "\n".join(lines)
