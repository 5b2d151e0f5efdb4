"""Reward models behind one protocol, and `load_reward`, the public entry point.

    reward = load_reward("pickscore", device="cuda")            # default weights from the hub
    reward = load_reward("aesthetic=/models/aesthetic.pth")      # name=source: a local file/folder or hub id
    reward = load_reward("my_pkg.judges:sharpness")              # a user callable (images, prompts) -> scores
    scores = reward.score(images, prompts)                       # float32 tensor (N,), on the CPU
    reward.info  # {"metric", "model", "version", "scale", "preprocessing", ...}: recorded with every number

The name table `REWARDS` is closed (no registry). Every scorer loads its weights from a hub id or a
local folder/file through the same code the tests exercise on tiny random-weight models of the real
architectures. Heavy libraries are imported inside functions; importing this module is cheap.
Conventions and scales: docs/metrics.md.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ModelLoadError, UserError

# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


class RewardModel:
    """Scores (image, prompt) pairs; higher is better.

    Subclasses set `name` and `info` and implement `_score_batch`; `score` validates inputs and
    outputs and batches. `info` states model id, version, scale and preprocessing, so that every
    reported number carries its provenance.
    """

    name: str = "reward"
    info: dict[str, Any]
    batch_size: int = 16

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """Scores of `images[i]` for `prompts[i]`: float32 tensor (N,), on the CPU."""
        if len(images) != len(prompts):
            raise UserError(f"reward {self.name!r}: {len(images)} images but {len(prompts)} prompts")
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                imgs = [im.convert("RGB") for im in images[start:start + self.batch_size]]
                out.append(self._score_batch(imgs, list(prompts[start:start + self.batch_size])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Loading helpers
# ------------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def _load_error(what: str, source: str, err: Exception, flag: str) -> ModelLoadError:
    hint = (" (offline: HF_HUB_OFFLINE is set and no cached copy was found)" if _offline() else "")
    return ModelLoadError(f"cannot load {what} from {source!r}{hint}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}; pass a local copy with {flag}")


def _from_pretrained(cls: Any, source: str, what: str, flag: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` on a local folder or hub id, errors turned into one clear ModelLoadError."""
    local = Path(source).exists()
    if not local and source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what}: {source!r} does not exist; pass an existing folder with {flag}")
    try:
        return cls.from_pretrained(source, local_files_only=local or _offline(), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _load_error(what, source, err, flag) from err


def _fetch_file(source: str, default_filename: str, what: str, flag: str, suffixes: tuple[str, ...]) -> Path:
    """A weights file: a local file, a local folder holding `default_filename` (or a single file with one of
    `suffixes`), a hub id ("repo" or "repo/filename" with a matching suffix) or an https URL (cached)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / default_filename).is_file():
            return path / default_filename
        candidates = sorted(p for p in path.iterdir() if p.suffix in suffixes)
        if len(candidates) == 1:
            return candidates[0]
        raise ModelLoadError(f"{what}: folder {path} holds no {default_filename} (and not exactly one "
                             f"{'/'.join(suffixes)} file); pass the file itself with {flag}")
    if source.startswith(("http://", "https://")):
        return _download_url(source, what, flag)
    if source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what}: {source!r} does not exist; pass an existing file with {flag}")
    repo, filename = source, default_filename
    if source.endswith(suffixes) and source.count("/") >= 2:
        repo, filename = source.rsplit("/", 1)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, local_files_only=_offline()))
    except Exception as err:  # hub errors: offline, missing repo/file, network
        raise _load_error(what, f"{repo}/{filename}", err, flag) from err


def _download_url(url: str, what: str, flag: str) -> Path:
    import hashlib
    import urllib.request

    from diffusion_dpo.evaluate.prompts import default_cache_dir

    target = default_cache_dir().parent / "weights" / (hashlib.sha1(url.encode()).hexdigest()[:12] + "_" +
                                                       url.rsplit("/", 1)[-1].replace("+", "_"))
    if target.exists():
        return target
    if _offline():
        raise ModelLoadError(f"cannot load {what} from {url}: offline and not cached at {target}; "
                             f"pass a local copy with {flag}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 (fixed public URL)
        os.replace(tmp, target)
    except Exception as err:
        raise _load_error(what, url, err, flag) from err
    return target


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch pickle (.pt/.pth/.bin, read with weights_only=True).
    A checkpoint dict with a "state_dict" entry is unwrapped; a DataParallel "module." prefix is removed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read weights {path}: {type(err).__name__}: {err}") from err
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _device_dtype(device: str | torch.device, dtype: torch.dtype | str) -> tuple[torch.device, torch.dtype]:
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    return torch.device(device), dtype


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# CLIP-family scorers (transformers CLIPModel)
# ------------------------------------------------------------------------------------------------


class _ClipEmbedder:
    """Projected, L2-normalised CLIP image and text embeddings from a transformers CLIPModel.
    Uses vision_model/text_model pooled outputs and the projections explicitly (stable across versions)."""

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return _normalize(self.model.visual_projection(pooled).float())

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.processor(text=prompts, padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        pooled = self.model.text_model(input_ids=ids).pooler_output
        return _normalize(self.model.text_projection(pooled).float())


def _load_clip(source: str, processor_source: str | None, what: str, flag: str, device, dtype) -> _ClipEmbedder:
    from transformers import CLIPModel, CLIPProcessor

    model = _from_pretrained(CLIPModel, source, what, flag)
    proc_src = processor_source or source
    if processor_source is None and Path(source).is_dir() and not any(
            (Path(source) / f).exists() for f in ("preprocessor_config.json", "processor_config.json")):
        raise ModelLoadError(f"{what}: folder {source} has no processor files (preprocessor_config.json); "
                             f"save the CLIPProcessor there or pass processor=PATH")
    processor = _from_pretrained(CLIPProcessor, proc_src, f"{what} processor", flag)
    return _ClipEmbedder(model, processor, device, dtype)


class PickScore(RewardModel):
    """PickScore (Kirstain et al. 2023): a CLIP-H fine-tune on Pick-a-Pic. Scale "logit" (default,
    logit_scale.exp() * cosine, about 20-23 as papers report) or "cosine" (the raw cosine, as the
    official Diffusion-DPO code computes)."""

    DEFAULT_SOURCE = "yuvalkirstain/PickScore_v1"
    DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32, processor: str | None = None,
                 scale: str = "logit", batch_size: int = 16):
        if scale not in ("logit", "cosine"):
            raise UserError(f"pickscore: scale must be 'logit' or 'cosine', got {scale!r}")
        device, dtype = _device_dtype(device, dtype)
        source = source or self.DEFAULT_SOURCE
        if processor is None and not Path(source).is_dir():  # the hub PickScore repo ships no processor
            processor = self.DEFAULT_PROCESSOR
        self.name = "pickscore" if scale == "logit" else "pickscore_cosine"
        self.clip = _load_clip(source, processor, "PickScore", "--metric pickscore=PATH", device, dtype)
        self.scale, self.batch_size = scale, batch_size
        self.info = {"metric": self.name, "model": source, "processor": processor or source,
                     "version": "PickScore_v1" if source == self.DEFAULT_SOURCE else "custom",
                     "scale": ("logit_scale.exp() * cosine (papers: about 20-23)" if scale == "logit"
                               else "raw cosine in [-1, 1] (official Diffusion-DPO code)"),
                     "preprocessing": "CLIPProcessor: resize shortest side 224 bicubic, center crop 224, "
                                      "CLIP mean/std; prompt truncated to 77 tokens"}

    def _score_batch(self, images, prompts):
        cos = (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)
        if self.scale == "cosine":
            return cos
        return self.clip.model.logit_scale.exp().float() * cos


class ClipScore(RewardModel):
    """CLIP score. Default: torchmetrics' convention, max(100 * cosine, 0) with OpenAI CLIP ViT-L/14.
    `scale=1` and `clamp=False` give the raw cosine (Diffusion-DPO used OpenCLIP ViT-H/14 that way)."""

    DEFAULT_SOURCE = "openai/clip-vit-large-patch14"

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32, processor: str | None = None,
                 scale: float = 100.0, clamp: bool = True, batch_size: int = 16):
        device, dtype = _device_dtype(device, dtype)
        source = source or self.DEFAULT_SOURCE
        self.name = "clip"
        self.clip = _load_clip(source, processor, "CLIP score model", "--metric clip=PATH", device, dtype)
        self.scale, self.clamp, self.batch_size = float(scale), bool(clamp), batch_size
        self.info = {"metric": "clip", "model": source, "version": source.rstrip("/").rsplit("/", 1)[-1],
                     "scale": f"{'max(' if clamp else ''}{self.scale:g} * cosine{', 0)' if clamp else ''}",
                     "preprocessing": "CLIPProcessor of the model (resize, center crop, CLIP mean/std); "
                                      "prompt truncated to 77 tokens"}

    def _score_batch(self, images, prompts):
        s = self.scale * (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)
        return s.clamp(min=0) if self.clamp else s


class AestheticMLP(torch.nn.Module):
    """The LAION "improved aesthetic predictor" head: 768-1024-128-64-16-1, dropouts, no activations.
    State-dict keys layers.{0,2,4,6,7}.{weight,bias} as in the released .pth files."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(RewardModel):
    """LAION aesthetic predictor v2: OpenAI CLIP ViT-L/14 image embedding, L2-normalised, into the MLP head.
    Scale about 1-10. `source` is the MLP weights (.pth/.safetensors, folder or URL); `clip` the CLIP model."""

    DEFAULT_SOURCE = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac+logos+ava1-l14-linearMSE.pth")
    DEFAULT_CLIP = "openai/clip-vit-large-patch14"

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32, clip: str | None = None,
                 processor: str | None = None, batch_size: int = 16):
        device, dtype = _device_dtype(device, dtype)
        source = source or self.DEFAULT_SOURCE
        clip = clip or self.DEFAULT_CLIP
        self.name = "aesthetic"
        weights = _fetch_file(source, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic MLP weights",
                              "--metric aesthetic=PATH", (".pth", ".pt", ".safetensors", ".bin"))
        sd = load_state_dict(weights)
        if "layers.0.weight" not in sd:
            raise ModelLoadError(f"{weights}: not a LAION aesthetic MLP state dict (no 'layers.0.weight'; "
                                 f"found {', '.join(list(sd)[:4])}...)")
        self.mlp = AestheticMLP(sd["layers.0.weight"].shape[1])
        try:
            self.mlp.load_state_dict(sd)
        except RuntimeError as err:
            raise ModelLoadError(f"{weights}: does not match the 768-1024-128-64-16-1 aesthetic MLP: {err}") from err
        self.mlp.to(device=device, dtype=torch.float32).eval()
        self.clip = _load_clip(clip, processor, "aesthetic CLIP model", "--metric-option aesthetic.clip=PATH",
                               device, dtype)
        dim = self.clip.model.config.projection_dim
        if dim != self.mlp.layers[0].in_features:
            raise ModelLoadError(f"aesthetic: CLIP {clip} embeds to {dim} dims but the MLP {weights} expects "
                                 f"{self.mlp.layers[0].in_features} (it needs CLIP ViT-L/14)")
        self.batch_size = batch_size
        self.info = {"metric": "aesthetic", "model": f"{clip} + {source}",
                     "version": "LAION improved aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE)"
                     if source == self.DEFAULT_SOURCE else "custom MLP weights",
                     "scale": "about 1-10 (AVA rating scale)",
                     "preprocessing": "CLIPProcessor (resize 224 bicubic, center crop, CLIP mean/std); "
                                      "image embedding L2-normalised before the MLP"}

    @torch.no_grad()
    def _score_batch(self, images, prompts):
        return self.mlp(self.clip.images(images)).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# HPS v2 / v2.1: open_clip ViT-H-14 weights loaded into transformers' CLIPModel
# ------------------------------------------------------------------------------------------------

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


# OpenAI CLIP's pixel statistics, which HPSv2's transform normalises with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

        device, dtype = _device_dtype(device, dtype)
        source = source or self.DEFAULT_REPO
        self.name = "hpsv21" if version == "2.1" else "hpsv2"
        if not isinstance(antialias, bool):
            raise UserError(f"{self.name}: antialias must be true or false, got {antialias!r}")
        flag = f"--metric {self.name}=PATH"
        weights = _fetch_file(source, self.FILES[version], f"HPS v{version} checkpoint", flag,
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
        tok = (_from_pretrained(CLIPTokenizer, tokenizer, "HPS tokenizer", flag) if tokenizer
               else clip_bpe_tokenizer())
        size = model.config.vision_config.image_size
        self.clip = _ClipEmbedder(model, _Processor(partial(hps_pixels, size=size, antialias=antialias), tok),
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


# ------------------------------------------------------------------------------------------------
# Text alignment (the DrawBench table's recipe): caption, then sentence similarity
# ------------------------------------------------------------------------------------------------

DEFAULT_CAPTION_QUERY = "Answer concisely: what is going on in this image?"


class HFCaptioner:
    """Captions images with any transformers image-to-text / vision-language model.
    With a chat template (LLaVA, ...) the query is asked as a user turn; without one (BLIP-style
    captioners) the model captions unconditionally and the query is not used."""

    def __init__(self, source: str, device, dtype, query: str = DEFAULT_CAPTION_QUERY, temperature: float = 0.2,
                 max_new_tokens: int = 60, seed: int = 0):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        flag = "--metric-option text_alignment.captioner=PATH"
        self.processor = _from_pretrained(AutoProcessor, source, "captioning processor", flag)
        self.model = _from_pretrained(AutoModelForImageTextToText, source, "captioning model", flag)
        self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.query, self.temperature, self.max_new_tokens, self.seed = query, temperature, max_new_tokens, seed
        self.chat = bool(self.processor.chat_template)
        self.source = source

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.query}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        sample = self.temperature > 0
        torch.manual_seed(self.seed)  # sampled captions are reproducible
        gen = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                  **({"temperature": self.temperature} if sample else {}))
        if self.chat:  # decoder-only VLMs return the prompt too
            gen = gen[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(gen, skip_special_tokens=True)]


class TextAlignment(RewardModel):
    """Cosine between sentence-transformers embeddings of an image caption and of
    "The image contains {prompt}" (Curriculum-DPO's DrawBench table). `captioner` is a model id/folder
    or a callable (images) -> captions; `sentence_model` a sentence-transformers id/folder."""

    DEFAULT_CAPTIONER = "llava-hf/llava-1.5-13b-hf"
    DEFAULT_SENTENCE_MODEL = "sentence-transformers/paraphrase-MiniLM-L6-v2"

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32,
                 captioner: str | Callable[[list], list[str]] | None = None, sentence_model: str | None = None,
                 query: str = DEFAULT_CAPTION_QUERY, template: str = "The image contains {prompt}",
                 temperature: float = 0.2, max_new_tokens: int = 60, batch_size: int = 8):
        device, dtype = _device_dtype(device, dtype)
        captioner = captioner or source or self.DEFAULT_CAPTIONER
        sentence_model = sentence_model or self.DEFAULT_SENTENCE_MODEL
        self.name = "text_alignment"
        if callable(captioner):
            self.captioner, cap_name = captioner, getattr(captioner, "__name__", type(captioner).__name__)
        else:
            self.captioner, cap_name = HFCaptioner(captioner, device, dtype, query, temperature, max_new_tokens), captioner
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ModelLoadError("text_alignment needs sentence-transformers: pip install 'diffusion-dpo[eval]'") from err
        self.encoder = _load_sentence_model(SentenceTransformer, sentence_model, device)
        self.template, self.batch_size = template, batch_size
        self.last_captions: list[str] = []
        self.info = {"metric": "text_alignment", "model": f"captioner {cap_name} + sentences {sentence_model}",
                     "version": "Curriculum-DPO DrawBench recipe",
                     "scale": "cosine in [-1, 1] (DrawBench table: about 0.57-0.61)",
                     "preprocessing": f"caption query {query!r} (temperature {temperature}); "
                                      f"prompt wrapped as {template!r}"}

    @torch.no_grad()
    def _score_batch(self, images, prompts):
        captions = list(self.captioner(images))
        if len(captions) != len(images):
            raise UserError(f"text_alignment: the captioner returned {len(captions)} captions for {len(images)} images")
        self.last_captions = captions
        a = self.encoder.encode(captions, convert_to_tensor=True, normalize_embeddings=True)
        b = self.encoder.encode([self.template.format(prompt=p) for p in prompts], convert_to_tensor=True,
                                normalize_embeddings=True)
        return (a * b).sum(-1)


def _load_sentence_model(cls: Any, source: str, device) -> Any:
    local = Path(source).exists()
    try:
        return cls(source, device=str(device), local_files_only=local or _offline())
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _load_error("sentence-transformers model", source, err,
                          "--metric-option text_alignment.sentence_model=PATH") from err


# ------------------------------------------------------------------------------------------------
# User callables
# ------------------------------------------------------------------------------------------------


class CallableReward(RewardModel):
    """Wraps a function (images, prompts) -> scores (a sequence or tensor of N finite numbers)."""

    def __init__(self, fn: Callable[[list, list[str]], Any], name: str | None = None, batch_size: int = 16):
        self.fn = fn
        self.label = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.name = name or getattr(fn, "__name__", "callable")
        self.batch_size = batch_size
        self.info = {"metric": self.name, "model": self.label, "version": "user callable",
                     "scale": "as returned by the function", "preprocessing": "PIL RGB images as given"}

    def _score_batch(self, images, prompts):
        try:
            out = self.fn(images, prompts)
        except Exception as err:
            raise UserError(f"reward function {self.label} raised {type(err).__name__}: {err}") from err
        try:
            t = torch.as_tensor(out, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"reward function {self.label} returned {type(out).__name__}, not numbers: {err}") from err
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (len(images),):
            raise UserError(f"reward function {self.label} returned shape {tuple(t.shape)} for {len(images)} images; "
                            f"it must return one score per image, shape ({len(images)},)")
        if not torch.isfinite(t).all():
            raise UserError(f"reward function {self.label} returned non-finite scores (NaN or inf) for "
                            f"{int((~torch.isfinite(t)).sum())} of {len(images)} images")
        return t


def _import_user_module(name: str) -> Any:
    """importlib.import_module, then, if the top-level module is not found, once more with the current folder
    on sys.path: `python -m` puts it there but the `diffusion-dpo` console script does not, and the docs'
    `--reward my_rewards:fn` means ./my_rewards.py. Appended last, so it never shadows an installed module."""
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != top or cwd in sys.path or not (Path(top + ".py").is_file() or Path(top).is_dir()):
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(name)


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = _import_user_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UserError(f"reward {spec!r}: importing module {module_name!r} failed: {err}") from err
        raise UserError(f"reward {spec!r}: no module {err.name!r} on the Python path or in the current folder "
                        f"{os.getcwd()}; check the name, run from the folder that holds it, or add that folder "
                        f"to PYTHONPATH") from err
    except Exception as err:  # the user's module raised while importing (SyntaxError, a missing dependency...)
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"reward {spec!r}: importing module {module_name!r} failed: {type(err).__name__}: "
                        f"{first}") from err
    fn = module
    for part in attr.split("."):
        if part not in vars(fn):
            raise UserError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = vars(fn)[part]
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {attr!r} is not callable")
    return fn


# ------------------------------------------------------------------------------------------------
# The closed name table and the public entry point
# ------------------------------------------------------------------------------------------------

def _imagereward(**kwargs: Any) -> RewardModel:
    from diffusion_dpo.evaluate.imagereward import ImageReward  # its own module, which imports this one

    return ImageReward(**kwargs)


# name -> (constructor, fixed keyword arguments, one-line description)
REWARDS: dict[str, tuple[Callable[..., RewardModel], dict[str, Any], str]] = {
    "pickscore": (PickScore, {"scale": "logit"}, "PickScore v1, logit_scale.exp() * cosine (as papers report)"),
    "pickscore_cosine": (PickScore, {"scale": "cosine"}, "PickScore v1, raw cosine (official Diffusion-DPO code)"),
    "hpsv2": (HPS, {"version": "2.0"}, "HPS v2.0, raw cosine (x100 in the HPSv2 paper)"),
    "hpsv21": (HPS, {"version": "2.1"}, "HPS v2.1, raw cosine (the DrawBench table's 'HPSv2')"),
    "aesthetic": (Aesthetic, {}, "LAION aesthetic predictor v2 on CLIP ViT-L/14, scale about 1-10"),
    "clip": (ClipScore, {}, "CLIP score, max(100 * cosine, 0) with OpenAI CLIP ViT-L/14 (torchmetrics)"),
    "text_alignment": (TextAlignment, {}, "caption + sentence-transformers cosine (DrawBench table recipe)"),
    "imagereward": (_imagereward, {}, "ImageReward v1.0 (BLIP + BERT cross-encoder), (mlp - 0.167) / 1.033"),
}


def load_reward(spec: str | Callable | RewardModel, device: str | torch.device = "cpu",
                dtype: torch.dtype | str = torch.float32, *, source: str | None = None, batch_size: int | None = None,
                **options: Any) -> RewardModel:
    """Load a reward model.

    spec: a name from REWARDS ("pickscore", "hpsv21", ...); "name=SOURCE" with SOURCE a local folder/file
      or hub id (same as `source=`); "module.path:function" naming a callable (images, prompts) -> scores;
      a callable; or a RewardModel (returned as is).
    options: scorer-specific keywords (e.g. processor=, clip=, captioner=, sentence_model=, scale=).
    Raises UserError subclasses for unknown names, bad options and weights that cannot be loaded.
    """
    if isinstance(spec, RewardModel):
        return spec
    if callable(spec):
        return CallableReward(spec, **({"batch_size": batch_size} if batch_size else {}))
    name, _, inline_source = str(spec).partition("=")
    name = name.strip()
    if ":" in name and name not in REWARDS:
        return CallableReward(_import_callable(name), name=name, **({"batch_size": batch_size} if batch_size else {}))
    key = name.lower()
    if key not in REWARDS:
        raise UserError(f"unknown metric {name!r}; choose one of: {', '.join(REWARDS)} "
                        f"(or 'module:function' for your own reward)")
    cls, fixed, _ = REWARDS[key]
    kwargs = {**fixed, **options}
    if batch_size:
        kwargs["batch_size"] = batch_size
    try:
        return cls(source=inline_source or source, device=device, dtype=dtype, **kwargs)
    except TypeError as err:
        raise UserError(f"metric {key!r}: bad option: {err}") from err


def describe_rewards() -> str:
    width = max(map(len, REWARDS))
    return "\n".join(f"{name:<{width}}  {desc}" for name, (_, _, desc) in REWARDS.items())
