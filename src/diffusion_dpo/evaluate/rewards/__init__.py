"""Reward models behind one protocol, and `load_reward`, the public entry point.

    reward = load_reward("pickscore", device="cuda")            # default weights from the hub
    reward = load_reward("aesthetic=/models/aesthetic.pth")      # name=source: a local file/folder or hub id
    reward = load_reward("my_pkg.judges:sharpness")              # a user callable (images, prompts) -> scores
    scores = reward.score(images, prompts)                       # float32 tensor (N,), on the CPU
    reward.info  # {"metric", "model", "version", "scale", "preprocessing", ...}: recorded with every number

The name table `REWARDS` is closed (no registry). Every scorer loads its weights from a hub id or a
local folder/file through the same code the tests exercise on tiny random-weight models of the real
architectures. Heavy libraries are imported inside functions; importing this package is cheap.
Conventions and scales: docs/metrics.md.

Modules: base (the protocol), hub (where weights come from), clip (PickScore, CLIP score, aesthetic),
hps (HPS v2/v2.1), imagereward, text_alignment, user_callable (module:function rewards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluate.rewards.base import CLIP_MEAN, CLIP_STD, RewardModel
from diffusion_dpo.evaluate.rewards.clip import Aesthetic, AestheticMLP, ClipScore, PickScore
from diffusion_dpo.evaluate.rewards.hps import HPS, clip_bpe_tokenizer, hps_pixels, open_clip_to_transformers
from diffusion_dpo.evaluate.rewards.hub import load_state_dict
from diffusion_dpo.evaluate.rewards.imagereward import ImageReward
from diffusion_dpo.evaluate.rewards.text_alignment import HFCaptioner, TextAlignment
from diffusion_dpo.evaluate.rewards.user_callable import CallableReward, import_callable

__all__ = ["CLIP_MEAN", "CLIP_STD", "HPS", "REWARDS", "Aesthetic", "AestheticMLP", "CallableReward", "ClipScore",
           "HFCaptioner", "ImageReward", "PickScore", "RewardModel", "TextAlignment", "clip_bpe_tokenizer",
           "describe_rewards", "hps_pixels", "load_reward", "load_state_dict", "open_clip_to_transformers"]

# name -> (constructor, fixed keyword arguments, one-line description)
REWARDS: dict[str, tuple[Callable[..., RewardModel], dict[str, Any], str]] = {
    "pickscore": (PickScore, {"scale": "logit"}, "PickScore v1, logit_scale.exp() * cosine (as papers report)"),
    "pickscore_cosine": (PickScore, {"scale": "cosine"}, "PickScore v1, raw cosine (official Diffusion-DPO code)"),
    "hpsv2": (HPS, {"version": "2.0"}, "HPS v2.0, raw cosine (x100 in the HPSv2 paper)"),
    "hpsv21": (HPS, {"version": "2.1"}, "HPS v2.1, raw cosine (the DrawBench table's 'HPSv2')"),
    "aesthetic": (Aesthetic, {}, "LAION aesthetic predictor v2 on CLIP ViT-L/14, scale about 1-10"),
    "clip": (ClipScore, {}, "CLIP score, max(100 * cosine, 0) with OpenAI CLIP ViT-L/14 (torchmetrics)"),
    "text_alignment": (TextAlignment, {}, "caption + sentence-transformers cosine (DrawBench table recipe)"),
    "imagereward": (ImageReward, {}, "ImageReward v1.0 (BLIP + BERT cross-encoder), (mlp - 0.167) / 1.033"),
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
        return CallableReward(import_callable(name), name=name, **({"batch_size": batch_size} if batch_size else {}))
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
    """The REWARDS table, one "name  description" line per reward (for --help texts)."""
    width = max(map(len, REWARDS))
    return "\n".join(f"{name:<{width}}  {desc}" for name, (_, _, desc) in REWARDS.items())
