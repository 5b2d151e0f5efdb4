"""Steps on the prepared cache: ours (a, b: the trainer's own step) and the bare minimum (d)."""

from __future__ import annotations

from typing import Callable


def tweak_unet(unet, job: dict):
    """--channels-last and --compile, applied in place (the module keeps its attributes: adapters, config)."""
    import torch

    if job["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    if job["compile"]:
        unet.compile()
    return unet


def our_step(job: dict, device) -> Callable[[], None]:
    """(a) / (b) / (e) / (f): the trainer's own set-up and inner loop body (train/trainer.py): Trainer.micro_step
    encodes the batch and calls train.step.preference_step, the one step function of training and evaluation.
    (e): train.reference=cached (the store is computed in set-up, untimed); (f): simpo, no reference."""
    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import Trainer

    finetune = "full" if job["variant"] == "b" else "lora"
    strategy = {"e": ["train.reference=cached"], "f": ["train.method=simpo"]}.get(job["variant"], [])
    cfg = load_config(None, [f"model.pretrained={job['model']}", f"data.source={job['cache']}",
                             f"data.resolution={job['resolution']}", f"train.batch_size={job['pairs']}",
                             f"train.finetune={finetune}", f"lora.rank={job['lora_rank']}", "train.max_steps=100000",
                             "train.checkpoint_every=0", f"train.mixed_precision='{job['mixed_precision']}'",
                             f"train.lean_autograd={str(job.get('lean_autograd', True)).lower()}",
                             f"train.gradient_checkpointing={str(job.get('gradient_checkpointing', False)).lower()}",
                             f"train.seed={job['seed']}", "output.report_to=none", f"output.dir={job['out']}",
                             *strategy])
    tr = Trainer(cfg).setup()
    tweak_unet(tr.accelerator.unwrap_model(tr.unet), job)
    if job["fused_adamw"]:
        tr.optimizer.optimizer.param_groups[0]["fused"] = True
        tr.optimizer.optimizer.defaults["fused"] = True
    acc = tr.accelerator
    batches = iter(tr.loader)

    def step():
        raw = next(batches)
        loss, metrics, _ = tr.micro_step(raw)
        acc.backward(loss)
        acc.clip_grad_norm_(tr.params, cfg.train.max_grad_norm)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
        {k: v.item() for k, v in metrics.items()}  # the trainer logs every step

    step.unet = acc.unwrap_model(tr.unet)
    return step


def bare_step(job: dict, device) -> Callable[[], None]:
    """(d): the least work a LoRA DPO step can do: tensors ready on the device, one reference forward with
    adapters off, one policy forward + backward, an optimizer step. The UNet is called as diffusers' SD
    training scripts call it; a size-conditioned UNet (the cache holds pooled text embeddings: SDXL) also gets the
    pooled embeddings and the official constant time ids (res, res, 0, 0, res, res), as the diffusers SDXL DPO
    script passes them."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusion_dpo.cache.store import read_shard
    from diffusion_dpo.losses import dpo_logit
    from diffusion_dpo.models.lora import add_lora

    path, b = job["model"], job["pairs"]
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)
    add_lora(unet, job["lora_rank"], None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    if job.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    tweak_unet(unet, job)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=job["fused_adamw"] or None)
    shard = read_shard(job["cache"], 0)  # per-pair tensors, each pair's prompt-table row in its place
    latents = torch.cat([shard["latent_mean"][:b, 0, 0], shard["latent_mean"][:b, 0, 1]]).float().to(device)  # (2B,...)
    emb = shard["prompt_embeds"][:b].float().repeat(2, 1, 1).to(device)
    noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (b,), device=device).repeat(2)
    noisy = scheduler.add_noise(latents, noise, t)
    added = {}
    if "pooled_prompt_embeds" in shard:
        res = job["resolution"]
        added = {"added_cond_kwargs": {
            "text_embeds": shard["pooled_prompt_embeds"][:b].float().repeat(2, 1).to(device),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device).repeat(2 * b, 1)}}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if job["mixed_precision"] == "bf16" else torch.float16,
                              enabled=job["mixed_precision"] != "no")

    def step():
        with autocast:
            with torch.no_grad():
                unet.disable_adapters()
                ref = unet(noisy, t, emb, **added).sample
                unet.enable_adapters()
            pred = unet(noisy, t, emb, **added).sample
        err = (pred.float() - noise).pow(2).mean(dim=[1, 2, 3])
        err_ref = (ref.float() - noise).pow(2).mean(dim=[1, 2, 3])
        loss = -F.logsigmoid(dpo_logit(err[:b], err[b:], err_ref[:b], err_ref[b:], 2000.0)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    step.unet = unet
    return step
