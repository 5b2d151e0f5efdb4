"""Random-initialised pipelines of the real diffusers/transformers classes.

Used by the test suite (tiny models saved to a temp folder and loaded back through the real
loading code), by `diffusion-dpo bench` (real architecture sizes, random weights) and by the demo
(a miniature Stable Diffusion trained from scratch). Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch

Family = Literal["sd", "sdxl", "lcm"]

_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-:;()/&")


def build_clip_tokenizer(words: Iterable[str] = ()):
    """A CLIPTokenizer (real class, byte-level BPE) whose vocabulary is every single character plus
    whole-word tokens for `words` (built by merges), so prompts of a small world tokenise compactly
    and any other text still tokenises (character by character)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for tok in _SPECIAL:
        add(tok)
    for ch in _CHARS:
        add(ch)
        add(ch + "</w>")
    wanted = sorted({w.lower() for w in words if w and len(w) >= 2 and all(c in _CHARS for c in w.lower())})

    def join(pieces: list[str]) -> None:  # left-to-right merges joining these pieces into one token
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current = current + piece
            add(current)

    for word in wanted:  # "c i" -> "ci", "ci r" -> "cir", ..., the last piece carries </w>
        join(list(word[:-1]) + [word[-1] + "</w>"])
    # BPE applies the lowest-ranked merge first, so one word's merges can split another ("r i" from
    # "right" breaks "t r" in "triangle"). Add merges joining whatever pieces remain, until every word
    # is one token.
    for _ in range(8):
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
        split = [(w, tok.tokenize(w)) for w in wanted]
        split = [(w, pieces) for w, pieces in split if len(pieces) > 1]
        if not split:
            break
        for _, pieces in split:
            join(pieces)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _unet_kwargs(arch: str) -> dict:
    if arch == "tiny":
        return dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                    norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if arch == "mid":  # 50.3M parameters (bench prints the count from the model)
        return dict(block_out_channels=(128, 256, 384), layers_per_block=2, cross_attention_dim=256, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if arch in ("sd15", "sdxl"):  # the published configs; build_unet sets the sample size and channels itself
        from diffusion_dpo.models.arch_configs import network_config

        return {k: v for k, v in network_config(arch).items() if k not in ("sample_size", "in_channels", "out_channels")}
    raise ValueError(f"unknown arch {arch!r}; choose tiny, mid, sd15 or sdxl")


def build_unet(family: Family = "sd", arch: str = "tiny", sample_size: int = 8, lcm_cond_dim: int = 32):
    from diffusers import UNet2DConditionModel

    kw = _unet_kwargs(arch)
    if family == "sdxl" and arch in ("tiny", "mid"):
        # SDXL micro-conditioning: pooled text (dim = text encoder 2 projection) + 6 time ids x addition_time_embed_dim
        pooled = kw["cross_attention_dim"]  # tiny/mid: text_encoder_2 projection_dim equals cross-attention width / 2
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=pooled // 2 + 6 * 8)
    if family == "lcm":
        kw.update(time_cond_proj_dim=lcm_cond_dim)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, **kw)


VAE_KINDS = ("small", "mid", "sd")


def build_vae(arch: str = "tiny", sample_size: int = 64):
    """Random-init AutoencoderKL. `arch`: tiny / small (two levels, 2x downsampling: a test VAE), mid (Stable
    Diffusion's VAE layout, 8x downsampling, at 11/32 of its width) or sd15 / sdxl / sd (Stable Diffusion's VAE).

    mid's width keeps SD 1.5's balance of work: encoding one image costs 1.36 forward passes of the mid UNet on
    its latent (SD 1.5 at 512 px: 1.39, both counted with torch's FlopCounterMode), so a benchmark of the
    official per-step encoding on mid weighs the VAE as a real SD 1.5 run does."""
    from diffusers import AutoencoderKL

    # scaling_factor 1.0 for the random small VAEs: SD's 0.18215 is calibrated for its trained VAE; on a random
    # one it would shrink the image-dependent part of the latents far below the diffusion noise.
    if arch in ("tiny", "small"):
        return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=32, sample_size=sample_size, scaling_factor=1.0)
    if arch == "mid":  # SD's layout, 4 channels per norm group as in SD (128 / 32)
        return AutoencoderKL(block_out_channels=(44, 88, 176, 176), layers_per_block=2, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             norm_num_groups=11, sample_size=sample_size, scaling_factor=1.0)
    if arch in ("sd15", "sdxl", "sd"):
        return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             sample_size=sample_size)
    raise ValueError(f"unknown VAE arch {arch!r}; choose tiny, small, mid, sd15, sdxl or sd")


ARCH_LATENT = {"tiny": 16, "mid": 32, "sd15": 64, "sdxl": 128}
"""Latent side per arch, the size its UNet is built for (bench's default resolution is this times the VAE's
downsampling: tiny 32 px, mid 256 px, sd15 512 px, sdxl 1024 px)."""


def arch_family(arch: str) -> Family:
    """The family build_pipeline builds for an arch of ARCH_LATENT: SDXL for sdxl, SD for the others."""
    return "sdxl" if arch == "sdxl" else "sd"


def vae_downsampling(arch: str) -> int:
    """Pixels per latent of build_vae(arch) along each side."""
    return 2 if arch in ("tiny", "small") else 8


def build_text_encoder(hidden_size: int = 32, layers: int = 2, heads: int = 4, vocab_size: int = 1000,
                       projection_dim: int | None = None, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 4, num_hidden_layers=layers,
                            num_attention_heads=heads, vocab_size=vocab_size, max_position_embeddings=77,
                            projection_dim=projection_dim or hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="quick_gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_pipeline(family: Family = "sd", arch: str = "tiny", prediction_type: str = "epsilon",
                   resolution: int = 32, words: Iterable[str] = (), seed: int = 0, vae: str | None = None):
    """A complete random-init pipeline of the real classes: StableDiffusionPipeline (sd),
    StableDiffusionXLPipeline (sdxl) or a latent-consistency StableDiffusionPipeline (lcm).
    `vae`: a build_vae kind other than the arch's own (e.g. "small" or "sd"); the UNet's sample size follows
    from the resolution and that VAE's downsampling."""
    from diffusers import (DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words)
    vocab = max(len(tokenizer), 64)
    vae = build_vae(vae or arch, sample_size=resolution)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_sample = resolution // down
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if arch in ("tiny", "mid"):
        width = _unet_kwargs(arch)["cross_attention_dim"]
    else:
        width = {"sd15": 768, "sdxl": 2048}[arch]
    if family == "sdxl":
        w1 = width // 2  # the two encoders' hidden states are concatenated to the cross-attention width
        te1 = build_text_encoder(hidden_size=w1, vocab_size=vocab)
        te2 = build_text_encoder(hidden_size=w1, vocab_size=vocab, with_projection=True, projection_dim=w1)
        if arch == "sdxl":
            te1 = build_text_encoder(hidden_size=768, layers=12, heads=12, vocab_size=49408)
            te2 = build_text_encoder(hidden_size=1280, layers=32, heads=20, vocab_size=49408, with_projection=True,
                                     projection_dim=1280)
        unet = build_unet("sdxl", arch, sample_size=unet_sample)
        scheduler = DDPMScheduler(**{k: v for k, v in sched_kw.items() if k != "set_alpha_to_one"})
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    if arch == "sd15":
        te = build_text_encoder(hidden_size=768, layers=12, heads=12, vocab_size=49408)
    else:
        te = build_text_encoder(hidden_size=width, heads=4, vocab_size=vocab)
    unet = build_unet(family, arch, sample_size=unet_sample)
    if family == "lcm":
        return LatentConsistencyModelPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                              scheduler=LCMScheduler(**sched_kw), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    scheduler = DDPMScheduler(**{k: v for k, v in sched_kw.items() if k != "set_alpha_to_one"})
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, family: Family = "sd", prediction_type: str = "epsilon",
                       resolution: int = 32, words: Iterable[str] = (), seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors); returns the path."""
    pipe = build_pipeline(family, "tiny", prediction_type=prediction_type, resolution=resolution, words=words, seed=seed)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
