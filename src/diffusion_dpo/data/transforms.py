"""Paired image transforms: resize the short side, optionally flip, crop to a square; record sizes and offsets.

Order per image: resize so the short side is `resolution` and the long side int(resolution * long / short)
(truncated, exactly torchvision's `Resize(int)`, which the official and diffusers scripts use; PIL
bilinear, antialiased) -> horizontal flip of the whole resized image (if drawn) -> crop to
`resolution` x `resolution`. Because the flip comes before the crop, `crop_top_left` is the offset of the
crop inside the image exactly as the model sees it, which is what SDXL's time ids describe.

`shared=False` (default, as in the official code): crop position and flip are drawn independently for
the winner and the loser. `shared=True`: one draw is used for both. When the two images have different
resized sizes, the shared draw is a RELATIVE crop position (the same fraction of each image's free
range, so both crops sit e.g. 30% from the top) and the same flip decision.

`same_geometry=True` (SDXL with data.sdxl_time_ids=pair): one geometry per pair, so one set of time ids
describes both images. The loser is resized straight to the winner's resized size (its aspect ratio is
not kept when it differs) and both are cropped at one position drawn once; its `original_size` is
reported as the winner's. Flips still follow `shared` (a flip is not part of the time ids). diffusers'
DPO script does the same in two resamplings (the loser to the winner's original size, then both);
one resampling loses less, and when the two sizes are equal (most pairs) nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from diffusion_dpo.config import DataConfig


@dataclass(frozen=True)
class PairTransform:
    resolution: int
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    shared: bool = False
    same_geometry: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig, size_conditioned: bool = False) -> PairTransform:
        """The transform a run uses; `size_conditioned`: the model family's (ModelFamily.size_conditioned,
        SDXL), whose pairs then get one geometry when data.sdxl_time_ids=pair."""
        same_geometry = size_conditioned and cfg.sdxl_time_ids == "pair"
        return cls(cfg.resolution, cfg.crop, cfg.random_flip, cfg.shared_transforms, same_geometry)

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")

    def __call__(self, img_w: Image.Image, img_l: Image.Image, generator: torch.Generator) -> dict:
        """Returns pixel_values float32 (2, 3, R, R) in [-1, 1] (row 0 winner, row 1 loser),
        original_size int64 (2, 2) as (h, w), crop_top_left int64 (2, 2) as (top, left), flipped bool (2,)."""
        # Always draw the same numbers (top, left, flip) for both images, whatever the settings, so the
        # generator advances identically and results depend only on the generator's seed.
        draws = torch.rand(2, 3, generator=generator, dtype=torch.float64)
        if self.shared:
            draws[1] = draws[0]
        size_w = self.resized_size(img_w.height, img_w.width)
        sizes = [(img_w.height, img_w.width), (img_l.height, img_l.width)]
        targets = [size_w, self.resized_size(img_l.height, img_l.width)]
        if self.same_geometry:
            draws[1, :2] = draws[0, :2]  # one crop position per pair: it is part of the conditioning
            sizes[1], targets[1] = sizes[0], size_w
        pixels, offsets, flips = [], [], []
        for img, target, (u_top, u_left, u_flip) in zip((img_w, img_l), targets, draws.tolist()):
            tensor, top, left, flipped = self._one(img, target, u_top, u_left, u_flip)
            pixels.append(tensor)
            offsets.append((top, left))
            flips.append(flipped)
        return {
            "pixel_values": torch.stack(pixels),
            "original_size": torch.tensor(sizes, dtype=torch.int64),
            "crop_top_left": torch.tensor(offsets, dtype=torch.int64),
            "flipped": torch.tensor(flips, dtype=torch.bool),
        }

    def single(self, img: Image.Image, generator: torch.Generator) -> dict:
        """One labelled image (no pair): pixel_values (3, R, R), original_size (2,), crop_top_left (2,), drawn as
        a winner's (top, left, flip) would be."""
        u_top, u_left, u_flip = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        tensor, top, left, _ = self._one(img, self.resized_size(img.height, img.width), u_top, u_left, u_flip)
        return {"pixel_values": tensor, "original_size": torch.tensor([img.height, img.width], dtype=torch.int64),
                "crop_top_left": torch.tensor([top, left], dtype=torch.int64)}

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after resizing: the short side becomes `resolution`, the long side
        int(resolution * long / short), truncated as torchvision's Resize(int) computes it (a 683x1024
        image at 512 becomes 512x767, not 512x768). Never below `resolution`: long >= short."""
        r = self.resolution
        if w <= h:
            return int(r * h / w), r
        return r, int(r * w / h)

    def _one(self, img: Image.Image, target: tuple[int, int], u_top: float, u_left: float,
             u_flip: float) -> tuple[torch.Tensor, int, int, bool]:
        r = self.resolution
        if img.mode != "RGB":
            img = img.convert("RGB")
        new_h, new_w = target
        if (new_h, new_w) != (img.height, img.width):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        flipped = self.random_flip and u_flip < 0.5
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.crop == "center":
            top, left = round((new_h - r) / 2), round((new_w - r) / 2)
        else:
            # floor(u * (n + 1)) is uniform over 0..n; min() covers u == 1.0 exactly.
            top = min(new_h - r, math.floor(u_top * (new_h - r + 1)))
            left = min(new_w - r, math.floor(u_left * (new_w - r + 1)))
        img = img.crop((left, top, left + r, top + r))
        array = np.asarray(img, dtype=np.uint8)  # (R, R, 3)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, R, R)
        return tensor, top, left, flipped
