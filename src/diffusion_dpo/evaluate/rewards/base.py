"""The reward protocol every scorer implements, and what several scorers share (embedding normalisation,
OpenAI CLIP's pixel statistics)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffusion_dpo.errors import UserError

# OpenAI CLIP's pixel statistics: HPSv2's transform and BLIP's (ImageReward's) normalise with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis (embeddings before a cosine)."""
    return x / x.norm(dim=-1, keepdim=True)
