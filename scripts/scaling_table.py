"""The planner's table of docs/scaling.md: SD 1.5, SDXL, SD3.5 Medium and Large, Flux.1-dev x LoRA / full
fine-tuning x 1, 8 and 64 GPUs of 80 GiB.

    python scripts/scaling_table.py [--json FILE]

One simulation per model and method (plan.simulate on the published configs of models/arch_configs.py), then
each world size's engines from it (plan.engines). A cell gives the recommended engine (the first that fits in
plan.engines.ENGINES order) and its GiB per device, with DDP's figure beside a sharded one. The recipe: data.format=cache (latents and text embeddings
prepared: no VAE or text encoder in training), 1 pair per GPU at the model's resolution, bf16 autocast,
model.frozen_dtype=bfloat16 (the LoRA base and the frozen reference copy in bf16), gradient checkpointing, AdamW,
LoRA rank 8 on the attention projections, train.reference=live."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WORLD_SIZES = (1, 8, 64)
DEVICE = 80 * 2**30
RECIPE = ["data.format=cache", "train.batch_size=1", "train.mixed_precision=bf16", "model.frozen_dtype=bfloat16",
          "train.gradient_checkpointing=true", "train.optimizer=adamw", "lora.rank=8"]
NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd35m": "SD3.5 Medium", "sd35l": "SD3.5 Large", "flux": "Flux.1-dev"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every engine's numbers here")
    parser.add_argument("--archs", default="sd15,sdxl,sd35m,sd35l,flux")
    args = parser.parse_args()

    from diffusion_dpo.config import load_config
    from diffusion_dpo.models.arch_configs import RESOLUTION
    from diffusion_dpo.plan.engines import plan_engines, recommend
    from diffusion_dpo.plan.model import describe_arch
    from diffusion_dpo.plan.simulate import simulate

    gib = 2**30
    print("| model | method | one GPU, no sharding: peak (weights + reference / gradients + optimizer / activations) "
          "| 1 GPU | 8 GPUs | 64 GPUs | TFLOP per pair |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    out = {}
    for arch in args.archs.split(","):
        for finetune in ("lora", "full"):
            cfg = load_config(None, [*RECIPE, f"data.resolution={RESOLUTION[arch]}", f"train.finetune={finetune}"])
            profile = simulate(cfg, describe_arch(arch), RESOLUTION[arch])
            parts = profile.at_peak()
            weights = parts["policy_trainable"] + parts["policy_frozen"] + parts["reference"]
            cells = []
            for n in WORLD_SIZES:
                rows = plan_engines(profile, n, DEVICE)
                best, ddp = recommend(rows), rows[0]
                out[f"{arch}/{finetune}/{n}"] = rows
                if best is None:
                    low = min(rows, key=lambda r: r["bytes_per_device"])
                    cells.append(f"none fits (least: {low['engine']} {low['bytes_per_device'] / gib:.1f})")
                else:  # DDP's figure beside a sharded recommendation: what sharding saves
                    cells.append(f"**{best['engine']}** {best['bytes_per_device'] / gib:.1f}"
                                 + ("" if best is ddp else f" (ddp {ddp['bytes_per_device'] / gib:.1f})"))
            print(f"| {NAMES[arch]} | {finetune} | {profile.peak / gib:.1f} ({weights / gib:.1f} / "
                  f"{(parts['gradients'] + parts['optimizer']) / gib:.1f} / {parts['activations'] / gib:.1f}) | "
                  + " | ".join(cells) + f" | {profile.flops / 1e12:.1f} |", flush=True)
            out[f"{arch}/{finetune}"] = {"peak": profile.peak, "at_peak": parts, "flops": profile.flops,
                                         "parameters": profile.parameters}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
