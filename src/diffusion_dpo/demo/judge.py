"""The demo's hidden taste: a programmatic judge that prefers VIVID objects.

The world draws each object somewhere between a muted version of its colour (the pure colour mixed half
way with grey) and the pure, vivid one (`world.object_rgb`), and the caption never says which. A model
trained on the world therefore draws muted and vivid objects at random for the same prompt: best-of-K
pairs carry signal, and the property is a per-pixel colour shift a LoRA can learn. The judge never reads
the caption, so the taste does not ask for anything the prompt contradicts; prompt fidelity is measured
apart (`demo.fidelity`).

score = how far the object's colour has moved from the muted end of its colour towards the vivid end:
the object's core pixels (the half farthest from the background, so blurred edges and object size do not
count) are projected on the muted -> vivid segment of the world colour nearest to their mean hue, clipped
to [0, 1] and averaged. Renders score exactly their vividness; 0.0 when no coloured object is found.

Why not simply the object's chroma (max - min of RGB), the first version of this judge: chroma is blind to
hue, and Diffusion-DPO found the cheap way to raise it, drifting reds towards orange and greens towards
blue (prompt fidelity fell by 5 to 16 points on held-out prompts while the judge rose; docs/demo.md). Measuring
vividness along each colour's own muted -> vivid line rewards only the property the world varies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from diffusion_dpo.demo.vision import THRESHOLD, MIN_PIXELS, background_distance, classify_color
from diffusion_dpo.demo.world import COLORS, object_rgb

_MUTED = {name: np.asarray(object_rgb(name, 0.0)) for name in COLORS}
_VIVID = {name: np.asarray(object_rgb(name, 1.0)) for name in COLORS}


def judge_score(image: Image.Image) -> float:
    px, dist = background_distance(image)
    mask = dist > THRESHOLD
    if int(mask.sum()) < MIN_PIXELS:
        return 0.0
    core = mask & (dist >= np.median(dist[mask]))
    rgb = px[core].astype(np.float64)  # (N, 3)
    family = classify_color(tuple(rgb.mean(axis=0)))
    if family is None:  # grey: no colour to be vivid
        return 0.0
    muted, line = _MUTED[family], _VIVID[family] - _MUTED[family]
    position = (rgb - muted) @ line / float(line @ line)  # 0 at the muted end, 1 at the vivid end
    return float(np.clip(position, 0.0, 1.0).mean())


def judge_scores(images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> torch.Tensor:
    """(N,) float32 scores of `images`, higher = preferred. `prompts` is accepted for the reward-model
    call shape (images, prompts) and ignored: the taste does not depend on the prompt."""
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return torch.tensor([judge_score(im) for im in images], dtype=torch.float32)
