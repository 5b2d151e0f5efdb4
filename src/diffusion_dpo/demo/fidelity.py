"""Prompt fidelity from the image alone: does the image show the colour and the shape the prompt asks for?

Per image 1 if the object found by `demo.vision.find_object` has the prompt's colour (nearest world
hue of its mean colour) and shape (bounding-box fill ratio), else 0 (also 0 when no object is found).
Position is not checked. Ground-truth renders of the world score 100%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from diffusion_dpo.demo.vision import find_object
from diffusion_dpo.demo.world import parse_caption


@dataclass(frozen=True)
class FidelityResult:
    per_image: torch.Tensor  # (N,) float32 of 0/1
    color_ok: torch.Tensor  # (N,) 0/1
    shape_ok: torch.Tensor  # (N,) 0/1

    @property
    def percent(self) -> float:
        return 100.0 * float(self.per_image.mean()) if len(self.per_image) else 0.0


def fidelity(images: Sequence[Image.Image], prompts: Sequence[str]) -> FidelityResult:
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    color_ok, shape_ok = [], []
    for image, prompt in zip(images, prompts):
        color, shape, _ = parse_caption(prompt)
        info = find_object(image)
        color_ok.append(float(info is not None and info.color == color))
        shape_ok.append(float(info is not None and info.shape == shape))
    c, s = torch.tensor(color_ok), torch.tensor(shape_ok)
    return FidelityResult(per_image=c * s, color_ok=c, shape_ok=s)
