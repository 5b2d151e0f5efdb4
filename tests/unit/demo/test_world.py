"""The demo world: determinism, caption <-> render agreement, prompt split."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_dpo.demo import world
from diffusion_dpo.demo.vision import find_object


def test_dataset_is_deterministic_in_seed():
    a = world.sample_dataset(12, seed=3)
    b = world.sample_dataset(12, seed=3)
    c = world.sample_dataset(12, seed=4)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, c))


def test_caption_round_trip_and_vocabulary():
    vocab = set(world.vocabulary())
    for prompt in world.all_prompts():
        color, shape, position = world.parse_caption(prompt)
        assert world.caption(color, shape, position) == prompt
        assert set(prompt.split()) <= vocab
    with pytest.raises(ValueError):
        world.parse_caption("a photo of a cat")


def test_split_is_disjoint_and_covers_every_word():
    train, held = world.train_prompts(), world.heldout_prompts()
    assert len(train) + len(held) == len(world.all_prompts()) == 135
    assert not set(train) & set(held)
    for prompts in (train, held):
        parsed = [world.parse_caption(p) for p in prompts]
        assert {c for c, _, _ in parsed} == set(world.COLORS)
        assert {s for _, s, _ in parsed} == set(world.SHAPES)
        assert {p for _, _, p in parsed} == set(world.POSITIONS)


def test_render_matches_caption():
    """The object sits where the caption says (3x3 grid cell), on the plain background."""
    for image, prompt, scene in world.sample_dataset(60, seed=0, prompts=world.all_prompts()):
        assert image.size == (world.SIZE, world.SIZE)
        px = np.asarray(image)
        assert tuple(px[0, 0]) == world.BACKGROUND or tuple(px[-1, -1]) == world.BACKGROUND
        info = find_object(image)
        cx, cy = info.center
        row, col = world.POSITIONS[scene.position]
        assert abs(cx - (8 + 8 * col)) <= 3 and abs(cy - (8 + 8 * row)) <= 3, prompt
        assert world.parse_caption(prompt)[:2] == (scene.color, scene.shape)


def test_every_caption_fits_the_base_tokenizer_context():
    """The base pads prompts to 16 tokens; every caption must fit untruncated."""
    from diffusion_dpo.demo.pretrain import PretrainConfig
    from diffusion_dpo.models.build import build_clip_tokenizer

    tok = build_clip_tokenizer(world.vocabulary())
    longest = max(len(tok(p).input_ids) for p in world.all_prompts())
    assert longest <= PretrainConfig.max_tokens
    assert len(tok("a red circle at the top left").input_ids) == 7 + 2  # whole-word tokens plus start/end
