"""Random-initialised pipelines of the real diffusers/transformers classes.

Used by the test suite (tiny models saved to a temp folder and loaded back through the real
loading code), by `diffusion-dpo bench` (real architecture sizes, random weights) and by the demo
(a miniature Stable Diffusion trained from scratch). Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch

Family = Literal["sd", "sdxl", "lcm", "sd3", "flux"]
FLOW_FAMILIES = ("sd3", "flux")
"""Families build_pipeline builds as flow-matching transformer pipelines (build_flow_pipeline)."""

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


ARCH_LATENT = {"tiny": 16, "mid": 32, "sd15": 64, "sdxl": 128, "sd35m": 128, "sd35l": 128, "flux": 128}
"""Latent side per arch, the size its network is built for (bench's default resolution is this times the VAE's
downsampling: tiny 32 px, mid 256 px, sd15 512 px, sdxl and the flow archs (build_real_flow_pipeline) 1024 px)."""


def arch_family(arch: str) -> Family:
    """The family of an arch of ARCH_LATENT: SDXL for sdxl, SD3 for sd35m/sd35l, Flux for flux, SD for the others."""
    return "sdxl" if arch == "sdxl" else FLOW_ARCHS.get(arch, "sd")


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
    StableDiffusionXLPipeline (sdxl), a latent-consistency StableDiffusionPipeline (lcm), or (tiny only)
    StableDiffusion3Pipeline (sd3) / FluxPipeline (flux) from build_flow_pipeline.
    `vae`: a build_vae kind other than the arch's own (e.g. "small" or "sd"); the UNet's sample size follows
    from the resolution and that VAE's downsampling."""
    from diffusers import (DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    if family in FLOW_FAMILIES:
        if arch != "tiny" or vae is not None:
            raise ValueError(f"build_pipeline builds {family} pipelines at arch 'tiny' only (real sizes: models.arch_configs)")
        return build_flow_pipeline(family, resolution=resolution, words=words, seed=seed)
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
    """Build a tiny pipeline and save it as a diffusers folder (safetensors); returns the path. `prediction_type`
    is ignored by the flow-matching families (sd3, flux: the network predicts the velocity)."""
    pipe = build_pipeline(family, "tiny", prediction_type=prediction_type, resolution=resolution, words=words, seed=seed)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------- flow matching
T5_MAX_LENGTH = 512
"""model_max_length of build_t5_tokenizer (the real T5-XXL tokenizers' of SD3 and Flux)."""


def build_t5_tokenizer(words: Iterable[str] = ()):
    """A T5TokenizerFast (a Unigram model of the `tokenizers` library, no sentencepiece, no hub) whose pieces are
    every character, with and without the word-start marker, plus whole-word pieces for `words` scored above them,
    so a small world's prompts tokenise one piece per word and any other text still tokenises. Ids 0/1/2 are
    <pad>/</s>/<unk> as in T5."""
    from transformers import T5TokenizerFast

    start = "\u2581"  # sentencepiece's word-start marker
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, start: -2.0}
    for ch in _CHARS:
        pieces.setdefault(start + ch, -4.0)
        pieces.setdefault(ch, -5.0)
    for w in sorted({w.lower() for w in words if w and all(c in _CHARS for c in w.lower())}):
        pieces[start + w] = -1.0
    return T5TokenizerFast(vocab=list(pieces.items()), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_t5_encoder(d_model: int = 32, layers: int = 1, heads: int = 2, vocab_size: int = 128, d_kv: int | None = None,
                     d_ff: int | None = None):
    """A random-init T5EncoderModel (the real class) from a small T5Config (d_kv, d_ff: d_model / heads, 2 d_model)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv or d_model // heads, d_ff=d_ff or 2 * d_model,
                      num_layers=layers,
                      num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def build_flow_vae(sample_size: int = 32):
    """A tiny AutoencoderKL with the flow-matching families' 16 latent channels and a shift factor (SD3 0.0609,
    Flux 0.1159 in the real VAEs; 0.1 here so the shift is exercised). Scale 1.0 as build_vae's small VAEs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=sample_size, scaling_factor=1.0, shift_factor=0.1)


def build_flow_pipeline(family: Family = "sd3", resolution: int = 32, words: Iterable[str] = (), seed: int = 0):
    """A tiny random-init StableDiffusion3Pipeline (sd3: MMDiT with 2 joint layers; CLIP-L + CLIP-G with projections,
    T5) or FluxPipeline (flux: 1 double + 1 single stream block with the guidance embedding of the guidance-distilled
    dev checkpoints; CLIP-L, T5), of the real classes, with a FlowMatchEulerDiscreteScheduler configured as the real
    pipelines' (SD3: shift 3.0; Flux dev: dynamic, resolution-dependent shift). Latents are resolution / 2 pixels."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    clip_tok = build_clip_tokenizer(words)
    t5_tok = build_t5_tokenizer(words)
    vocab = max(len(clip_tok), 64)
    vae = build_flow_vae(sample_size=resolution)
    latent = resolution // 2
    t5 = build_t5_encoder(d_model=32, vocab_size=max(len(t5_tok), 64))
    if family == "sd3":
        clip_l = build_text_encoder(hidden_size=16, vocab_size=vocab, heads=2, with_projection=True, projection_dim=16)
        clip_g = build_text_encoder(hidden_size=24, vocab_size=vocab, heads=2, with_projection=True, projection_dim=24)
        # joint_attention_dim = T5 width (the CLIP states, 16 + 24, are zero-padded to it); pooled = 16 + 24
        transformer = SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=16, pooled_projection_dim=40,
                                            pos_embed_max_size=max(latent // 2, 8))
        return _flow_pipeline("sd3", transformer, vae, [clip_l, clip_g, t5], clip_tok, t5_tok)
    if family != "flux":
        raise ValueError(f"build_flow_pipeline builds sd3 or flux, not {family!r}")
    clip_l = build_text_encoder(hidden_size=16, vocab_size=vocab, heads=2)
    # packed 2x2 tokens: in_channels = 16 latent channels x 4; rope axes sum to the head dim
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return _flow_pipeline("flux", transformer, vae, [clip_l, t5], clip_tok, t5_tok)


def _flow_pipeline(family: Family, transformer, vae, encoders: list, clip_tok, t5_tok):
    """The real pipeline class of a flow family around its parts (`encoders` in the pipeline's order: SD3 CLIP-L,
    CLIP-G, T5; Flux CLIP-L, T5), with a FlowMatchEulerDiscreteScheduler configured as the real pipelines'."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    if family == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3/3.5's scheduler config
        clip_l, clip_g, t5 = encoders
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                                        tokenizer=clip_tok, text_encoder_2=clip_g, tokenizer_2=clip_tok,
                                        text_encoder_3=t5, tokenizer_3=t5_tok)
    # FLUX.1-dev's scheduler config: shift 3.0 unused, dynamic shifting over 256..4096 image tokens
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    clip_l, t5 = encoders
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


FLOW_ARCHS = {"sd35m": "sd3", "sd35l": "sd3", "flux": "flux"}
"""The real flow-matching architectures of models.arch_configs -> their family."""


def build_real_flow_pipeline(arch: str, resolution: int = 1024, words: Iterable[str] = (), seed: int = 0,
                             shrink: bool = False):
    """The real pipeline class around the real transformer of `arch` (FLOW_ARCHS; models.arch_configs), random
    weights, with STAND-IN text encoders and VAE: what `bench` times is the training step on a prepared cache, which
    runs the transformer only, so the encoders need only the real OUTPUT shapes. T5: one layer of the real d_model
    (joint_attention_dim 4096) with 2 heads of 16 and d_ff 32 (the real T5-XXL encoder is 4.76B parameters, 19 GB in
    fp32); each CLIP: one layer of its real hidden and projection sizes (pooled widths 768 + 1280 for SD3, 768 for
    Flux); VAE: the real 16-channel config (8x downsampling, scale, shift) at 32 channels per level, one layer each.
    `shrink` (tests only): one joint layer (Flux: one double + one single block) of 2 heads, for a CPU run."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    from diffusion_dpo.models.arch_configs import text_encoder_configs, transformer_config, vae_config

    if arch not in FLOW_ARCHS:
        raise ValueError(f"unknown flow arch {arch!r}; choose one of {', '.join(FLOW_ARCHS)}")
    family = FLOW_ARCHS[arch]
    torch.manual_seed(seed)
    cfg = transformer_config(arch)
    if shrink:
        cfg.update(num_layers=1, num_attention_heads=2)
        if family == "sd3":
            cfg.update(caption_projection_dim=2 * cfg["attention_head_dim"],
                       dual_attention_layers=[0] if cfg.get("dual_attention_layers") else [])
        else:
            cfg["num_single_layers"] = 1
    latent = resolution // 8
    if family == "sd3":
        transformer = SD3Transformer2DModel(**dict(cfg, sample_size=latent))
    else:
        transformer = FluxTransformer2DModel(**cfg)
    vae = AutoencoderKL(**dict(vae_config(arch), block_out_channels=[32] * 4, layers_per_block=1,
                               sample_size=resolution))
    clip_tok, t5_tok = build_clip_tokenizer(words), build_t5_tokenizer(words)
    vocab = max(len(clip_tok), 64)
    encoders = []
    for _, cls, real, _ in text_encoder_configs(arch):
        if cls == "T5EncoderModel":
            encoders.append(build_t5_encoder(d_model=real["d_model"], heads=2, d_kv=16, d_ff=32,
                                             vocab_size=max(len(t5_tok), 64)))
        else:
            encoders.append(build_text_encoder(hidden_size=real["hidden_size"], layers=1,
                                               heads=real["num_attention_heads"], vocab_size=vocab,
                                               projection_dim=real["projection_dim"],
                                               with_projection=cls == "CLIPTextModelWithProjection"))
    return _flow_pipeline(family, transformer, vae, encoders, clip_tok, t5_tok)
