"""User reward functions for the feedback tests: `feedback_test_rewards:<name>` (this folder is on sys.path)."""

from __future__ import annotations

import numpy as np

from diffusion_dpo.feedback.toy_rewards import brightness  # noqa: F401  (re-exported: prefers brighter images)


def darkness(images, prompts):
    return [1.0 - float(np.asarray(im, dtype=np.float64).mean() / 255.0) for im in images]


def raises(images, prompts):
    raise ValueError("model weights not found")


def wrong_shape(images, prompts):
    return [[0.0, 1.0]] * len(images)


def returns_nan(images, prompts):
    return [float("nan")] * len(images)


def quarters(images, prompts):
    """Mean brightness rounded to a multiple of 1/4: exactly representable scores (grey 64 -> 0.25,
    128 -> 0.5, 191 -> 0.75), so a score gap can equal a margin exactly in floating point."""
    return [round(float(np.asarray(im, dtype=np.float64).mean()) / 255.0 * 4) / 4 for im in images]
