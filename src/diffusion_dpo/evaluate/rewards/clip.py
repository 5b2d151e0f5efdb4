"""CLIP-family scorers on transformers' CLIPModel: PickScore, CLIP score and the LAION aesthetic predictor
(its MLP head on CLIP ViT-L/14 image embeddings). `ClipEmbedder` is also HPS's embedder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ModelLoadError, UserError
from diffusion_dpo.evaluate.rewards.base import RewardModel, l2_normalize
from diffusion_dpo.evaluate.rewards.hub import device_dtype, fetch_file, from_pretrained, load_state_dict


class ClipEmbedder:
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
        return l2_normalize(self.model.visual_projection(pooled).float())

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.processor(text=prompts, padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        pooled = self.model.text_model(input_ids=ids).pooler_output
        return l2_normalize(self.model.text_projection(pooled).float())


def load_clip(source: str, processor_source: str | None, what: str, flag: str, device, dtype) -> ClipEmbedder:
    from transformers import CLIPModel, CLIPProcessor

    model = from_pretrained(CLIPModel, source, what, flag)
    proc_src = processor_source or source
    if processor_source is None and Path(source).is_dir() and not any(
            (Path(source) / f).exists() for f in ("preprocessor_config.json", "processor_config.json")):
        raise ModelLoadError(f"{what}: folder {source} has no processor files (preprocessor_config.json); "
                             f"save the CLIPProcessor there or pass processor=PATH")
    processor = from_pretrained(CLIPProcessor, proc_src, f"{what} processor", flag)
    return ClipEmbedder(model, processor, device, dtype)


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
        device, dtype = device_dtype(device, dtype)
        source = source or self.DEFAULT_SOURCE
        if processor is None and not Path(source).is_dir():  # the hub PickScore repo ships no processor
            processor = self.DEFAULT_PROCESSOR
        self.name = "pickscore" if scale == "logit" else "pickscore_cosine"
        self.clip = load_clip(source, processor, "PickScore", "--metric pickscore=PATH", device, dtype)
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
        device, dtype = device_dtype(device, dtype)
        source = source or self.DEFAULT_SOURCE
        self.name = "clip"
        self.clip = load_clip(source, processor, "CLIP score model", "--metric clip=PATH", device, dtype)
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
        device, dtype = device_dtype(device, dtype)
        source = source or self.DEFAULT_SOURCE
        clip = clip or self.DEFAULT_CLIP
        self.name = "aesthetic"
        weights = fetch_file(source, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic MLP weights",
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
        self.clip = load_clip(clip, processor, "aesthetic CLIP model", "--metric-option aesthetic.clip=PATH",
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
