"""(c): the per-step work of the official Diffusion-DPO training script, written out as it does it.

Deliberately not our step: it decodes both JPEGs, VAE-encodes both images and runs the text encoder(s) in
every step, and trains a full UNet next to a full frozen copy. What is not the official code's own choice
comes from the library, so it cannot drift: the text encoders and their output (the family's
encode_prompts, which is the official code's rule) and the DPO logit (losses.dpo_logit: the official
inside_term, the same arithmetic on (B,) tensors, so the timing does not change)."""

from __future__ import annotations

from typing import Callable


def official_step(job: dict, device) -> Callable[[], None]:
    import io

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image

    from diffusion_dpo.losses import dpo_logit
    from diffusion_dpo.models.families import detect_spec, family_of

    path, res, b = job["model"], job["resolution"], job["pairs"]
    family = family_of(detect_spec(path))
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).requires_grad_(False)
    encode_text = family.prompt_encoder(torch.float32, device)  # no grad, as the official code's text encoding
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)
    ref_unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).requires_grad_(False)
    unet.train()
    if job.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8, weight_decay=1e-2)
    rows = pq.read_table(job["parquet"]).to_pylist()
    beta, position = 2000.0, [0]

    def to_pixels(jpeg: bytes) -> torch.Tensor:  # Resize(res) + CenterCrop(res) + ToTensor + Normalize([.5], [.5])
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        scale = res / min(img.size)
        img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        arr = np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5

    def step():
        batch = [rows[(position[0] + i) % len(rows)] for i in range(b)]
        position[0] += b
        # the official collate: winner and loser concatenated on the channel axis, label decides the order
        pixel_values = torch.stack([torch.cat([to_pixels(r["jpg_0"]), to_pixels(r["jpg_1"])] if r["label_0"] == 1
                                              else [to_pixels(r["jpg_1"]), to_pixels(r["jpg_0"])]) for r in batch])
        feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1)).to(device)  # (2B, 3, R, R)
        with torch.no_grad():
            latents = vae.encode(feed_pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=device).long().repeat(2)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        text = encode_text([r["caption"] for r in batch])
        encoder_hidden_states = text.prompt_embeds.repeat(2, 1, 1)
        added = None
        if family.size_conditioned:  # the official constant time ids (res, res, 0, 0, res, res)
            time_ids = torch.tensor([res, res, 0, 0, res, res], device=device, dtype=torch.float32).repeat(2 * b, 1)
            added = {"text_embeds": text.pooled_prompt_embeds.repeat(2, 1), "time_ids": time_ids}
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added).sample
        model_losses = (model_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        with torch.no_grad():
            ref_pred = ref_unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added).sample.detach()
            ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        inside_term = dpo_logit(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta)
        loss = -1 * F.logsigmoid(inside_term).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    step.unet = unet
    return step
