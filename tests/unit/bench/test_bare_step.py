"""bench variant (d), the bare LoRA step, runs on a size-conditioned UNet too (docs/performance.md's SDXL
command runs `--variants ad`); before, it called the SDXL UNet without time ids and crashed."""

from __future__ import annotations

import torch

from diffusion_dpo.bench.runner import setup_work
from diffusion_dpo.bench.steps import bare_step


def test_bare_step_runs_on_an_sdxl_unet_and_trains_the_adapter(tmp_path):
    model, _, cache = setup_work(tmp_path, "tiny", "sdxl", 32, 2, 0)
    job = {"model": str(model), "pairs": 2, "lora_rank": 4, "cache": str(cache), "resolution": 32,
           "mixed_precision": "no", "fused_adamw": False, "gradient_checkpointing": False, "channels_last": False,
           "lean_autograd": False, "compile": False}
    step = bare_step(job, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in step.unet.named_parameters() if p.requires_grad}
    step()
    changed = [n for n, p in step.unet.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # the optimizer stepped the LoRA weights
