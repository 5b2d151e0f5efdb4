"""The demo's hidden taste: a programmatic judge that prefers VIVID objects.

The world varies the colour treatment of the object (muted, grey-ish ... vivid, pure) without
saying so in the caption, so a model trained on it draws muted and vivid objects at random for the
same prompt: best-of-K pairs carry signal, and the property is a per-pixel colour shift a LoRA can
learn. The judge never reads the caption's colour or shape, so the taste does not conflict with
the prompt; prompt fidelity is measured apart (`demo.fidelity`).

score = mean over object pixels of (max(R,G,B) - min(R,G,B)) / 255   (the object's mean chroma),
0.0 when no object is found. Range [0, 1]; vivid renders score about 0.6-0.9, muted ones 0.3-0.45
(the exact values depend on the colour, so compare scores per prompt, as pairs and win rates do).
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from diffusion_dpo.demo.vision import find_object


def judge_score(image: Image.Image) -> float:
    info = find_object(image)
    return 0.0 if info is None else info.chroma / 255.0


def judge_scores(images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> torch.Tensor:
    """(N,) float32 scores of `images`, higher = preferred. `prompts` is accepted for the reward-model
    call shape (images, prompts) and ignored: the taste does not depend on the prompt."""
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return torch.tensor([judge_score(im) for im in images], dtype=torch.float32)
