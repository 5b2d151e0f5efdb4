"""The hidden-taste judge and the prompt-fidelity check, on rendered world images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo.demo import world
from diffusion_dpo.demo.fidelity import fidelity
from diffusion_dpo.demo.judge import judge_scores


def _scene(shape="circle", color="red", position="centre", radius=5.0, vividness=0.5):
    return world.Scene(shape, color, position, radius, vividness)


def test_fidelity_of_ground_truth_renders_is_100_percent():
    data = world.sample_dataset(400, seed=7, prompts=world.all_prompts())
    result = fidelity([d[0] for d in data], [d[1] for d in data])
    assert result.percent == 100.0
    assert result.per_image.shape == (400,)


def test_fidelity_catches_wrong_colour_shape_and_blank():
    red_circle = world.render(_scene())
    blank = Image.new("RGB", (world.SIZE, world.SIZE), world.BACKGROUND)
    result = fidelity([red_circle, red_circle, red_circle, blank],
                      ["a red circle in the centre", "a blue circle in the centre", "a red square in the centre",
                       "a red circle in the centre"])
    assert result.per_image.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert result.color_ok.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert result.shape_ok.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert result.percent == 25.0


@pytest.mark.parametrize("color", list(world.COLORS))
@pytest.mark.parametrize("shape", world.SHAPES)
def test_judge_prefers_vivid_over_muted(color, shape):
    images = [world.render(_scene(shape, color, vividness=v)) for v in (0.0, 0.5, 1.0)]
    scores = judge_scores(images, [world.caption(color, shape, "centre")] * 3)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] < scores[1] < scores[2]


def test_judge_ignores_size_and_position_and_scores_blank_zero():
    vivid_small_corner = world.render(_scene(position="top left", radius=3.5, vividness=1.0))
    vivid_large_centre = world.render(_scene(radius=7.0, vividness=1.0))
    muted_large_centre = world.render(_scene(radius=7.0, vividness=0.0))
    blank = Image.new("RGB", (world.SIZE, world.SIZE), world.BACKGROUND)
    s = judge_scores([vivid_small_corner, vivid_large_centre, muted_large_centre, blank])
    assert s[0] > 0.95 and s[1] > 0.95 and abs(float(s[0] - s[1])) < 0.03
    assert s[2] < 0.05 and s[3] == 0.0


def _disc(rgb):
    cover = world.shape_mask("circle", 16.0, 16.0, 6.0)[..., None]
    px = cover * np.asarray(rgb, dtype=np.float32) + (1 - cover) * np.asarray(world.BACKGROUND, dtype=np.float32)
    return Image.fromarray(px.round().astype(np.uint8))


def test_judge_does_not_reward_hue_drift():
    """A red drifted towards orange keeps the pure red's chroma (max - min = 200) but is not more vivid red:
    the judge scores it below the pure red and below a half-vivid red (the exploit of a chroma judge)."""
    pure, orange = _disc(world.COLORS["red"]), _disc((225, 110, 25))
    half = _disc(world.object_rgb("red", 0.5))
    s = judge_scores([pure, orange, half])
    assert s[0] > 0.95 and s[1] < s[2] < s[0]


def test_judge_tracks_vividness_across_random_scenes():
    data = world.sample_dataset(300, seed=11, prompts=world.all_prompts())
    scores = judge_scores([d[0] for d in data]).numpy()
    vivid = np.array([d[2].vividness for d in data])
    for color in world.COLORS:  # per colour the score is monotone in vividness (up to anti-aliasing)
        rows = [i for i, d in enumerate(data) if d[2].color == color]
        assert np.corrcoef(scores[rows], vivid[rows])[0, 1] > 0.98
