"""The memory and FLOPs planner behind `diffusion-dpo plan` (docs/scaling.md, "Planning memory").

For a training config it builds the model's real networks from their configs on the meta device (plan.model:
a local pipeline folder's configs, or the published ones of models.arch_configs), simulates two training steps
on fake tensors counting live bytes op by op and the step's FLOPs (plan.simulate, plan.tracker), then works
out each engine's per-device memory from that one simulation (plan.engines). plan.measure runs the same config
for real on the CPU to check the estimate.
"""

from __future__ import annotations

from typing import Optional


def make_plan(cfg, world_size: int, device_bytes: int, arch: Optional[str] = None) -> dict:
    """The plan of `cfg` (a config.RunConfig) on `world_size` devices of `device_bytes` each, as a JSON-ready dict:
    setup, single_device (peak and its parts), flops, engines (bytes per device, fits), recommended."""
    from diffusion_dpo.config import reference_strategy
    from diffusion_dpo.plan.engines import ALLOCATOR_MARGIN, CONTEXT_BYTES, plan_engines, recommend
    from diffusion_dpo.plan.model import describe_arch, describe_folder
    from diffusion_dpo.plan.simulate import on_the_fly, simulate

    desc = describe_arch(arch) if arch else describe_folder(cfg.model.pretrained)
    t = cfg.train
    profile = simulate(cfg, desc, cfg.data.resolution)
    strategy = reference_strategy(t)
    reference = {"none": "none", "cached": "cached errors (no network)"}.get(
        strategy, "the policy with adapters off (no copy)" if t.finetune == "lora" else
        f"frozen copy ({cfg.model.reference_dtype or cfg.model.frozen_dtype}"
        f"{', on the CPU between uses' if cfg.model.reference_on_cpu else ''})")
    engines = plan_engines(profile, world_size, device_bytes)
    return {
        "setup": {"model": desc.source, "network_class": desc.network_class, "parameters": profile.parameters,
                  "finetune": t.finetune, "reference": reference, "resolution": cfg.data.resolution,
                  "batch_size": t.batch_size, "gradient_accumulation": t.gradient_accumulation,
                  "optimizer": t.optimizer, "mixed_precision": t.mixed_precision,
                  "gradient_checkpointing": t.gradient_checkpointing, "lean_autograd": t.lean_autograd,
                  "encodes_on_the_fly": on_the_fly(cfg)},
        "world_size": world_size, "device_memory": device_bytes,
        "allocator_margin": ALLOCATOR_MARGIN, "context_bytes": CONTEXT_BYTES,
        "single_device": {"peak": profile.peak, "at_peak": profile.at_peak(), "largest_unit": profile.largest_unit},
        "flops": {"per_device_step": profile.flops,
                  "per_optimizer_step": profile.flops * t.gradient_accumulation * world_size},
        "engines": engines, "recommended": recommend(engines),
    }


__all__ = ["make_plan"]
