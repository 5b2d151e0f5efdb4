"""Human Preference Score v2.0 / v2.1: open_clip ViT-H-14 weights renamed into transformers' CLIPModel
(`open_clip_to_transformers`), the real CLIP BPE tokenizer built from open_clip's merges file without
importing open_clip (`clip_bpe_tokenizer`), and HPSv2's own image transform (`hps_pixels`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ModelLoadError, UserError
from diffusion_dpo.evaluate.rewards.base import CLIP_MEAN, CLIP_STD, RewardModel
from diffusion_dpo.evaluate.rewards.clip import ClipEmbedder
from diffusion_dpo.evaluate.rewards.hub import device_dtype, fetch_file, from_pretrained, load_state_dict

# open_clip's ViT-H-14 architecture, as a transformers CLIPConfig (GELU, LayerNorm eps 1e-5).
VIT_H_14 = {
    "projection_dim": 1024,
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-5},
}


def open_clip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict (visual.transformer.resblocks..., fused in_proj) to the keys
    of transformers' CLIPModel (vision_model.encoder.layers..., separate q/k/v)."""
    out: dict[str, torch.Tensor] = {}

    def block(prefix: str, target: str, i: str, rest: str, v: torch.Tensor) -> None:
        base = f"{target}.encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[-1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part.clone()
            return
        mapping = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        mod, param = rest.rsplit(".", 1)
        if mod not in mapping:
            raise ModelLoadError(f"open_clip key {prefix}{i}.{rest}: unsupported (not a plain ViT block)")
        out[f"{base}{mapping[mod]}.{param}"] = v

    top = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
           "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
           "visual.ln_post.weight": "vision_model.post_layernorm.weight",
           "visual.ln_post.bias": "vision_model.post_layernorm.bias",
           "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight",
           "ln_final.bias": "text_model.final_layer_norm.bias",
           "logit_scale": "logit_scale"}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v.reshape(()) if k == "logit_scale" else v
        elif k == "visual.proj":  # (width, embed) applied as x @ proj
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k.startswith("visual.transformer.resblocks."):
            i, rest = k.removeprefix("visual.transformer.resblocks.").split(".", 1)
            block("visual.transformer.resblocks.", "vision_model", i, rest, v)
        elif k.startswith("transformer.resblocks."):
            i, rest = k.removeprefix("transformer.resblocks.").split(".", 1)
            block("transformer.resblocks.", "text_model", i, rest, v)
        elif k == "attn_mask":  # causal mask buffer; transformers builds its own
            continue
        else:
            raise ModelLoadError(f"open_clip key {k!r} has no counterpart in a plain CLIP ViT "
                                 f"(HPS expects open_clip ViT-H-14 weights)")
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (same order as the CLIP BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_tokenizer(bpe_path: str | os.PathLike | None = None):
    """The real 49,408-token CLIP tokenizer (transformers CLIPTokenizer) built from the BPE merges file
    `bpe_simple_vocab_16e6.txt.gz` that ships inside open_clip_torch (found without importing open_clip,
    which needs torchvision) or at `bpe_path`."""
    import gzip
    import importlib.util

    from transformers import CLIPTokenizer

    if bpe_path is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("HPS needs the CLIP BPE vocabulary: pip install open_clip_torch --no-deps "
                                 "(it ships bpe_simple_vocab_16e6.txt.gz), or pass tokenizer=PATH (a CLIP "
                                 "tokenizer folder)")
        bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         unk_token="<|endoftext|>")



def hps_pixels(images: Sequence[Any], size: int, antialias: bool = True) -> torch.Tensor:
    """HPSv2's evaluation transform (its open_clip fork, `image_transform(..., resize_longest_max=True)`):
    RGB to float in [0, 1], resize the LONGEST side to `size` (bicubic, on the float tensor, so no rounding to
    8 bits and no clamping of the overshoot), pad to a `size` x `size` square with 0 (black, before
    normalising), the image centred and the odd pixel of padding on the right/bottom; then OpenAI CLIP mean/std.
    Nothing is cropped. New side lengths use Python's round(), as the reference does.

    antialias: torchvision >= 0.17 (what `pip install hpsv2` brings today) antialiases tensor resizes; older
    releases did not (False reproduces those). Differences from the reference: an image whose longest side
    is already `size` is padded here too (the reference leaves it unpadded and non-square, which its ViT
    cannot take); RGBA is scored as RGB (the reference keeps a 4th channel its ViT cannot take either).
    Returns (N, 3, size, size) float32."""
    import numpy as np

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        new_h, new_w = round(h * scale), round(w * scale)
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                                                antialias=antialias)[0]
        pad_h, pad_w = size - new_h, size - new_w  # (left, right, top, bottom): the extra pixel right/bottom
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        out.append((x - mean) / std)
    return torch.stack(out)


class HPS(RewardModel):
    """Human Preference Score v2.0 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPDv2.
    Score = cosine between image and prompt embeddings (raw, about 0.2-0.3; the HPSv2 paper reports x100).
    The open_clip checkpoint is renamed into transformers' CLIPModel (no open_clip / torchvision needed);
    images go through HPSv2's own transform (`hps_pixels`: longest side to 224 and pad, not crop)."""

    FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
    DEFAULT_REPO = "xswu/HPSv2"

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32, version: str = "2.1",
                 arch: dict | None = None, tokenizer: str | None = None, scale: float = 1.0, antialias: bool = True,
                 batch_size: int = 16):
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        device, dtype = device_dtype(device, dtype)
        source = source or self.DEFAULT_REPO
        self.name = "hpsv21" if version == "2.1" else "hpsv2"
        if not isinstance(antialias, bool):
            raise UserError(f"{self.name}: antialias must be true or false, got {antialias!r}")
        flag = f"--metric {self.name}=PATH"
        weights = fetch_file(source, self.FILES[version], f"HPS v{version} checkpoint", flag,
                              (".pt", ".pth", ".bin", ".safetensors"))
        sd = open_clip_to_transformers(load_state_dict(weights))
        model = CLIPModel(CLIPConfig(**(arch or VIT_H_14)))
        fits = f"{weights}: does not fit the {'custom' if arch else 'ViT-H-14'} architecture"
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ModelLoadError(f"{fits}: {str(err).splitlines()[1].strip()}") from err
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelLoadError(f"{fits}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        tok = (from_pretrained(CLIPTokenizer, tokenizer, "HPS tokenizer", flag) if tokenizer
               else clip_bpe_tokenizer())
        size = model.config.vision_config.image_size
        self.clip = ClipEmbedder(model, _Processor(partial(hps_pixels, size=size, antialias=antialias), tok),
                                  device, dtype)
        self.scale, self.batch_size = float(scale), batch_size
        self.info = {"metric": self.name, "model": f"{source} ({weights.name})", "version": f"HPS v{version}",
                     "architecture": "open_clip ViT-H-14" if arch is None else "custom (test) CLIP",
                     "scale": f"{self.scale:g} * cosine (DrawBench table: raw cosine about 0.28; HPSv2 paper: x100)",
                     "preprocessing": f"HPSv2's transform: resize the longest side to {size} (bicubic"
                                      f"{', antialiased' if antialias else ', no antialias'}), pad to a centred "
                                      f"square with black, OpenAI CLIP mean/std; CLIP BPE tokenizer, 77 tokens"}

    def _score_batch(self, images, prompts):
        return self.scale * (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)


@dataclass
class _Processor:
    """An image transform (images -> (N, 3, H, W) tensor) + tokenizer with CLIPProcessor's call signature."""

    pixels: Callable[[list], torch.Tensor]
    tokenizer: Any

    def __call__(self, images=None, text=None, **kw):
        if images is not None:
            return {"pixel_values": self.pixels(images)}
        return self.tokenizer(text, **kw)
