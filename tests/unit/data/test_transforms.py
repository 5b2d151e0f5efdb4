"""PairTransform: shapes, ranges, sizes and crop offsets derived by hand, shared vs independent draws."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.transforms import PairTransform


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x_ramp(height: int, width: int) -> Image.Image:
    """Red channel = 10 * x, so a pixel's value tells which source column it came from."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :, 0] = (np.arange(width) * 10)[None, :]
    return Image.fromarray(array)


def _column_x(pixels: torch.Tensor, column: int) -> int:
    """Source x of a crop column of a (3, R, R) tensor made from _x_ramp."""
    return round(((pixels[0, 0, column].item() + 1.0) * 127.5) / 10)


def test_shapes_dtypes_range_and_original_sizes():
    rng = np.random.default_rng(0)
    img_w = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    img_l = Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).convert("L")  # non-RGB input
    out = PairTransform(16, "random", True)(img_w, img_l, _gen(0))
    assert out["pixel_values"].shape == (2, 3, 16, 16) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_values"].min() >= -1.0 and out["pixel_values"].max() <= 1.0
    assert out["original_size"].dtype == torch.int64 and out["original_size"].tolist() == [[40, 60], [50, 30]]
    assert out["crop_top_left"].dtype == torch.int64 and out["flipped"].dtype == torch.bool


def test_pixel_scaling_is_exact():
    black, white = Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))
    out = PairTransform(8)(black, white, _gen(0))
    assert torch.all(out["pixel_values"][0] == -1.0) and torch.all(out["pixel_values"][1] == 1.0)


def test_center_crop_offsets_by_hand():
    # 40x60 (h, w) -> short side 16: 16x24, left = (24 - 16) / 2 = 4.
    # 50x30 -> 16/30 scale: height int(26.67) = 26 (torchvision truncates), top = round(10 / 2) = 5.
    out = PairTransform(16)(Image.new("RGB", (60, 40)), Image.new("RGB", (30, 50)), _gen(0))
    assert out["crop_top_left"].tolist() == [[0, 4], [5, 0]]
    assert out["flipped"].tolist() == [False, False]


def test_random_crop_takes_the_pixels_at_the_reported_offset():
    img = _x_ramp(16, 24)  # short side already 16: no resampling, crops are exact
    for seed in range(5):
        out = PairTransform(16, "random")(img, img, _gen(seed))
        for k in range(2):
            top, left = out["crop_top_left"][k].tolist()
            assert top == 0 and 0 <= left <= 8
            assert _column_x(out["pixel_values"][k], 0) == left and _column_x(out["pixel_values"][k], 15) == left + 15


def test_flip_happens_before_the_crop():
    img = _x_ramp(16, 24)
    seen_flip = False
    for seed in range(10):
        out = PairTransform(16, "random", random_flip=True)(img, img, _gen(seed))
        for k in range(2):
            left = out["crop_top_left"][k, 1].item()
            if out["flipped"][k]:
                seen_flip = True  # flipped image column x holds source column 23 - x
                assert _column_x(out["pixel_values"][k], 0) == 23 - left
            else:
                assert _column_x(out["pixel_values"][k], 0) == left
    assert seen_flip


def test_deterministic_for_a_fixed_generator():
    img_w, img_l = _x_ramp(20, 40), _x_ramp(30, 20)
    transform = PairTransform(16, "random", True)
    a, b = transform(img_w, img_l, _gen(7)), transform(img_w, img_l, _gen(7))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_independent_draws_differ_and_shared_draws_match():
    img = _x_ramp(16, 48)
    independent = [PairTransform(16, "random", True)(img, img, _gen(s)) for s in range(20)]
    assert any(o["crop_top_left"][0, 1] != o["crop_top_left"][1, 1] for o in independent)
    assert any(o["flipped"][0] != o["flipped"][1] for o in independent)
    for s in range(20):
        out = PairTransform(16, "random", True, shared=True)(img, img, _gen(s))
        assert torch.equal(out["crop_top_left"][0], out["crop_top_left"][1])
        assert out["flipped"][0] == out["flipped"][1]
        assert torch.equal(out["pixel_values"][0], out["pixel_values"][1])


def test_shared_draw_with_different_sizes_keeps_the_relative_position():
    wide, wider = _x_ramp(16, 24), _x_ramp(16, 40)  # free ranges 0..8 (9 values) and 0..24 (25 values)
    for s in range(20):
        out = PairTransform(16, "random", True, shared=True)(wide, wider, _gen(s))
        left_a, left_b = out["crop_top_left"][:, 1].tolist()
        assert abs((left_a + 0.5) / 9 - (left_b + 0.5) / 25) < 1 / 9  # same fraction u of each free range
        assert out["flipped"][0] == out["flipped"][1]


def _resized_crop(img: Image.Image, size_hw: tuple[int, int], top: int, left: int, r: int) -> torch.Tensor:
    """The expected pixels: PIL bilinear resize to the hand-computed size, crop, scale to [-1, 1]."""
    out = img.resize(size_hw[::-1], Image.Resampling.BILINEAR).crop((left, top, left + r, top + r))
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def test_long_side_is_truncated_as_torchvision_resize_does():
    # torchvision Resize(int): long = int(R * long / short). 7x10 (h, w) at 16: 16 * 10 / 7 = 22.86 -> 22
    # (rounding would give 23); centre crop left = round((22 - 16) / 2) = 3 (with 23: round(3.5) = 4).
    rng = np.random.default_rng(0)
    landscape = Image.fromarray(rng.integers(0, 256, (7, 10, 3), dtype=np.uint8))
    portrait = landscape.transpose(Image.Transpose.TRANSPOSE)  # 10x7
    out = PairTransform(16)(landscape, portrait, _gen(0))
    assert out["crop_top_left"].tolist() == [[0, 3], [3, 0]]
    assert torch.equal(out["pixel_values"][0], _resized_crop(landscape, (16, 22), 0, 3, 16))
    assert torch.equal(out["pixel_values"][1], _resized_crop(portrait, (22, 16), 3, 0, 16))
    # the example: 683x1024 at 512 -> 512x767 (not 768); centre crop left = round(255 / 2) = 128
    photo = Image.fromarray(rng.integers(0, 256, (683, 1024, 3), dtype=np.uint8))
    square = Image.new("RGB", (600, 600), (10, 20, 30))  # 600x600 -> 512x512, no crop offset
    out = PairTransform(512)(photo, square, _gen(0))
    assert out["crop_top_left"].tolist() == [[0, 128], [0, 0]]
    assert torch.equal(out["pixel_values"][0], _resized_crop(photo, (512, 767), 0, 128, 512))
    assert PairTransform(512).resized_size(683, 1024) == (512, 767)
    assert PairTransform(512).resized_size(1024, 683) == (767, 512)
    assert PairTransform(512).resized_size(600, 600) == (512, 512)


def test_random_crop_range_follows_the_truncated_size():
    # 7x10 at 16 -> 16x22: left in 0..6 (a rounded 23 would allow 7); all 7 values occur over enough draws
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 10, 3), dtype=np.uint8))
    lefts = {PairTransform(16, "random")(img, img, _gen(s))["crop_top_left"][0, 1].item() for s in range(200)}
    assert lefts == set(range(7))


def test_same_geometry_resizes_the_loser_to_the_winner_and_crops_both_at_one_place():
    # winner 40x60 (h, w) -> 16x24, centre left 4; loser 50x30 goes straight to 16x24 and is cropped at (0, 4)
    rng = np.random.default_rng(2)
    img_w = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    img_l = Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8))
    out = PairTransform(16, same_geometry=True)(img_w, img_l, _gen(0))
    assert out["original_size"].tolist() == [[40, 60], [40, 60]]
    assert out["crop_top_left"].tolist() == [[0, 4], [0, 4]]
    assert torch.equal(out["pixel_values"][0], _resized_crop(img_w, (16, 24), 0, 4, 16))
    assert torch.equal(out["pixel_values"][1], _resized_crop(img_l, (16, 24), 0, 4, 16))


def test_same_geometry_shares_the_random_crop_and_leaves_flips_to_shared():
    wide, wider = _x_ramp(16, 24), _x_ramp(16, 40)
    outs = [PairTransform(16, "random", True, same_geometry=True)(wide, wider, _gen(s)) for s in range(20)]
    assert all(torch.equal(o["crop_top_left"][0], o["crop_top_left"][1]) for o in outs)
    assert len({o["crop_top_left"][0, 1].item() for o in outs}) > 1  # still random across pairs
    assert any(o["flipped"][0] != o["flipped"][1] for o in outs)  # independent flips (shared=False)
    shared = [PairTransform(16, "random", True, True, same_geometry=True)(wide, wider, _gen(s)) for s in range(20)]
    assert all(o["flipped"][0] == o["flipped"][1] for o in shared)


def test_from_config():
    cfg = DataConfig(resolution=64, crop="random", random_flip=True, shared_transforms=True)
    assert PairTransform.from_config(cfg, size_conditioned=False) == PairTransform(64, "random", True, True)
    assert PairTransform.from_config(cfg, size_conditioned=True) == PairTransform(64, "random", True, True, same_geometry=True)
    per_image = DataConfig(resolution=64, sdxl_time_ids="image")
    assert PairTransform.from_config(per_image, size_conditioned=True) == PairTransform(64)
