"""Pretrain the demo's miniature Stable Diffusion from scratch on the demo world.

    python -m diffusion_dpo.demo.pretrain --out DIR [--vae-steps N] [--unet-steps N] [--threads T]

Real classes throughout (AutoencoderKL, CLIPTextModel + a CLIPTokenizer of the world's words,
UNet2DConditionModel, DDIMScheduler), saved as a StableDiffusionPipeline folder that stock diffusers
loads. Order:
  1. render a fixed training set of world images on the train captions (`world.sample_dataset`);
  2. VAE: reconstruction MSE + a small KL term (32x32x3 -> 16x16x4 latents; channels (16, 32));
  3. latent scaling factor = 1 / std of the training latents (as SD's 0.18215);
  4. UNet + text encoder jointly, epsilon-prediction MSE (the standard DDPM loss), 10% caption dropout
     so classifier-free guidance works, EMA of the UNet weights (the EMA copy is what is saved);
  5. save (float32 safetensors, about 5 MB) and write `pretrain.json`; interim saves every `save_every` steps.

Cost: about 15 minutes on 2 idle CPU cores. When other processes share the cores, pass `--threads 1`:
two OpenMP threads on one free core run several times slower than one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_dpo.demo import world

SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False)


@dataclass
class PretrainConfig:
    out: str = "demo_base"
    seed: int = 0
    num_images: int = 12000  # rendered training images (train captions only)
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5  # weight of the per-element mean KL against the reconstruction MSE
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 1.5e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    unet_channels: tuple[int, int] = (32, 64)
    max_tokens: int = 16  # captions are at most 9 tokens + 2 specials; short context = cheap cross-attention
    text_hidden: int = 64
    threads: int = 2
    log_every: int = 100
    save_every: int = 500  # unet steps between interim saves of the pipeline (0: only at the end)


def build_components(cfg: PretrainConfig):
    """Random-init tokenizer, text encoder, VAE, UNet and scheduler of the demo base."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from diffusion_dpo.models.build import build_clip_tokenizer, build_text_encoder

    torch.manual_seed(cfg.seed)
    tokenizer = build_clip_tokenizer(world.vocabulary())
    tokenizer.model_max_length = cfg.max_tokens  # the pipeline pads prompts to this length
    text_encoder = build_text_encoder(hidden_size=cfg.text_hidden, layers=2, heads=4, vocab_size=len(tokenizer))
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, in_channels=3, out_channels=3,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=world.SIZE)
    unet = UNet2DConditionModel(sample_size=world.SIZE // 2, in_channels=4, out_channels=4,
                                block_out_channels=cfg.unet_channels, layers_per_block=1,
                                cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=32,
                                # attention only at the 8x8 level: 16x16 self-attention would triple the cost
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    scheduler = DDIMScheduler(**SCHEDULER_KW, set_alpha_to_one=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, scheduler


def _pixels(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    data = world.sample_dataset(n, seed=seed)
    arr = np.stack([np.asarray(im) for im, _, _ in data])  # (N, 32, 32, 3) uint8
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 32, 32) in [-1, 1]
    return pixels, [c for _, c, _ in data]


def _lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, pixels: torch.Tensor, cfg: PretrainConfig, log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr(step, cfg.vae_steps, 50)
        x = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per-element mean KL
        loss = mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.2f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)  # (N, 4, 16, 16) each


def train_unet(unet, text_encoder, tokenizer, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str],
               scaling: float, cfg: PretrainConfig, log, on_checkpoint=None):
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**SCHEDULER_KW)
    # tokenise every distinct caption once (+ the empty caption for dropout)
    uniq = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(uniq)}
    ids_all = tokenizer(uniq, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # (U, 77)
    cap_idx = torch.tensor([index[c] for c in captions])
    empty = index[""]
    mean, std = latents
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _lr(step, cfg.unet_steps, cfg.warmup)
        rows = torch.randint(len(mean), (cfg.unet_batch,), generator=g)
        x0 = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)) * scaling
        idx = cap_idx[rows].clone()
        idx[torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout] = empty
        cond = text_encoder(ids_all[idx])[0]  # (B, 77, D)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if on_checkpoint is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
            on_checkpoint(ema, step + 1)  # a usable pipeline folder before the end of a long run
    text_encoder.eval()
    return ema.eval()


def pretrain(cfg: PretrainConfig) -> Path:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out.parent / f"{out.name}.pretrain.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    start = time.time()
    tokenizer, text_encoder, vae, unet, scheduler = build_components(cfg)
    log(f"params: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
        f"text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    pixels, captions = _pixels(cfg.num_images, cfg.seed)
    log(f"rendered {len(pixels)} images over {len(set(captions))} train captions")
    train_vae(vae, pixels, cfg, log)
    latents = encode_all(vae, pixels)
    scaling = float(1.0 / (latents[0] + latents[1] * torch.randn_like(latents[1])).std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae scaling factor {scaling:.4f} ({time.time() - start:.0f}s)")
    def save(ema_unet, steps_done: int) -> None:
        pipe = StableDiffusionPipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder),
                                       tokenizer=tokenizer, unet=copy.deepcopy(ema_unet), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # float32 on purpose: about 5 MB in all, and stock `from_pretrained(folder)` without torch_dtype would
        # otherwise load the text encoder in fp16 next to an fp32 UNet (transformers keeps the saved dtype)
        pipe.save_pretrained(out, safe_serialization=True)
        meta = asdict(cfg) | {"seconds": round(time.time() - start), "scaling_factor": scaling,
                              "unet_steps_done": steps_done}
        (out / "pretrain.json").write_text(json.dumps(meta, indent=2))
        log(f"saved {out} after {steps_done} unet steps")

    unet = train_unet(unet, text_encoder, tokenizer, latents, captions, scaling, cfg, log, on_checkpoint=save)
    save(unet, cfg.unet_steps)
    log(f"saved {out} in {time.time() - start:.0f}s")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument("--seed", type=int, default=PretrainConfig.seed)
    p.add_argument("--num-images", type=int, default=PretrainConfig.num_images)
    p.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    p.add_argument("--unet-steps", type=int, default=PretrainConfig.unet_steps)
    p.add_argument("--unet-batch", type=int, default=PretrainConfig.unet_batch)
    p.add_argument("--threads", type=int, default=PretrainConfig.threads)
    a = p.parse_args(argv)
    pretrain(PretrainConfig(out=a.out, seed=a.seed, num_images=a.num_images, vae_steps=a.vae_steps,
                            unet_steps=a.unet_steps, unet_batch=a.unet_batch, threads=a.threads))


if __name__ == "__main__":
    main()
