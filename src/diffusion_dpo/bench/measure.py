"""What a child measures about its variant: wall time per step, peak memory, FLOPs and MFU."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16/fp16 tensor-core peak (SXM) per device; fp32 runs are reported against the TF32 peak (half)."""


def rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MiB. Not getrusage's ru_maxrss: Linux carries it over
    from the parent across fork + exec, so a child would report at least the parent's size."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB (macOS: bytes)


def count_flops(step: Callable[[], Any]) -> float:
    """FLOPs of one call of `step`, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def time_step(step: Callable[[], Any], job: dict, device, base_rss: float) -> dict:
    """Warm `step` up, time job["steps"] calls, count its FLOPs: the result row of a/b/c/d.

    `step.unet` is the trained UNet: with gradient checkpointing the FLOPs are counted twice, once as run
    (recomputation included: hardware FLOPs) and once without it (model FLOPs, what MFU counts)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(job["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(job["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    hw_flops = flops = count_flops(step)  # what ran, recomputation included
    if job.get("gradient_checkpointing"):  # model FLOPs: the same step without recomputation
        step.unet.disable_gradient_checkpointing()
        flops = count_flops(step)
        step.unet.enable_gradient_checkpointing()
    mean = sum(times) / len(times)
    median = sorted(times)[len(times) // 2]
    name = device_name(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb("VmHWM")
    mfu = None
    if device.type == "cuda":
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak_tflops is not None:
            if job["mixed_precision"] == "no":
                peak_tflops /= 2  # TF32 tensor-core peak
            mfu = flops / mean / (peak_tflops * 1e12)
    # pairs/s from the median step: robust to a step slowed by another process on a shared machine
    return {"s_per_step": median, "s_mean": mean, "s_min": min(times), "s_all": times,
            "pairs_per_s": job["pairs"] / median, "peak_mem_mb": peak, "base_rss_mb": base_rss, "device": device.type,
            "device_name": name, "gflop_per_step": flops / 1e9, "hw_gflop_per_step": hw_flops / 1e9,
            "gflops_per_s": flops / mean / 1e9, "mfu": mfu, "hfu": None if mfu is None else mfu * hw_flops / flops}
