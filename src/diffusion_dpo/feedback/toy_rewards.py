"""Tiny rewards for smoke tests, docs and CPU-only trials: `--reward diffusion_dpo.feedback.toy_rewards:brightness`.

A user reward is any function (images: list[PIL.Image], prompts: list[str]) -> N scores, higher is better.
"""

from __future__ import annotations

import numpy as np


def brightness(images, prompts):
    """Mean pixel value in [0, 1] of each RGB image (prefers brighter images; ignores the prompt)."""
    return [float(np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255.0) for im in images]
