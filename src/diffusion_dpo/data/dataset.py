"""Decode + transform pairs for training on the fly, and collate them into the raw batch.

    transform = PairTransform.from_config(cfg.data, family.size_conditioned)  # family: models.families.family_of(spec)
    dataset = PairDataset(open_source(cfg.data), transform, seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_pairs)

A corrupt or missing image skips its pair (PairDataset returns None, collate_pairs drops it and counts it
in `num_skipped`) or raises CorruptImageError, per `on_corrupt`. Caption dropout is NOT applied here: the
trainer does it per pair, so the same dataset serves training, caching and evaluation.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from diffusion_dpo.data.records import ImageRecord, ImageRef, PairRecord
from diffusion_dpo.data.sources import PairSource
from diffusion_dpo.data.transforms import PairTransform
from diffusion_dpo.errors import CorruptImageError

log = logging.getLogger("diffusion_dpo")


def decode_image(ref: ImageRef, name: str | None = None) -> Image.Image:
    """Decode image bytes or a file into an 8-bit RGB PIL image; transparency is composited onto white.

    16-bit grayscale is scaled to 8 bits by its full range (see `_gray16_to_8bit`); 16-bit RGB(A) PNGs PIL
    already reduces to 8 bits per channel when it opens them. Raises CorruptImageError naming `name` (or
    the path) for a missing, unreadable, truncated or unsupported image, or a path that is not a regular
    file (opening a FIFO or a device would block forever). `img.load()` forces a full decode:
    `Image.open` alone reads only the header and would let a truncated JPEG through.
    """
    label = name or (str(ref) if isinstance(ref, (str, Path)) else f"<{len(ref)} image bytes>")
    try:
        if not isinstance(ref, bytes) and not stat.S_ISREG(os.stat(ref).st_mode):
            raise CorruptImageError(f"image {label} is not a regular file (a FIFO, device or folder): point to an image file")
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if img.mode.startswith("I"):
                return _gray16_to_8bit(img, label).convert("RGB")
            if img.mode == "F":
                raise CorruptImageError(f"image {label} has floating-point pixels (PIL mode F) of unknown range: "
                                        "save it as an 8- or 16-bit PNG or JPEG")
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise CorruptImageError(f"image file not found: {label}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL reports unidentifiable/truncated data as OSError (UnidentifiedImageError is one), some
        # malformed headers as ValueError or SyntaxError.
        raise CorruptImageError(f"cannot decode image {label}: {err}") from err


def _gray16_to_8bit(img: Image.Image, label: str) -> Image.Image:
    """16-bit grayscale (PIL modes I;16, I;16B, ... and I, which older Pillow gives 16-bit PNGs) -> mode L,
    value * 255 / 65535 rounded half up. `convert("RGB")` would clip every value above 255 to white.
    Mode I values outside 0..65535 (32-bit integer TIFFs) have no known range and are refused."""
    values = np.asarray(img, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise CorruptImageError(f"image {label} has integer pixels outside 0..65535 (PIL mode {img.mode}, range "
                                f"{values.min()}..{values.max()}): save it as an 8- or 16-bit PNG or JPEG")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, index): neighbouring indices get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def decode_pair(record: PairRecord, index: int, on_corrupt: str) -> tuple[Image.Image, Image.Image] | None:
    """Both images of a pair, or None for a corrupt one with on_corrupt='skip' (logged; the caller counts it).
    With on_corrupt='error' a CorruptImageError names the image and the setting that skips instead."""
    try:
        img_w = decode_image(record.chosen, f"{record.key} (chosen: {_short(record.chosen)})")
        img_l = decode_image(record.rejected, f"{record.key} (rejected: {_short(record.rejected)})")
    except CorruptImageError as err:
        if on_corrupt == "error":
            raise CorruptImageError(f"{err}. Set data.on_corrupt=skip to skip and count such pairs.") from err
        log.warning("skipping pair %d: %s", index, err)
        return None
    return img_w, img_l


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over a PairSource: item i is decoded, transformed and returned as a dict.

    Random crops/flips come from a torch.Generator seeded by (seed, epoch, i), so item i is the same in
    every process and worker and across resumes; call `set_epoch(e)` to draw new augmentations per epoch.
    """

    def __init__(self, source: PairSource, transform: PairTransform, seed: int = 0,
                 on_corrupt: Literal["skip", "error"] = "skip"):
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.on_corrupt = on_corrupt
        self.epoch = 0
        self.num_corrupt = 0
        """Corrupt pairs skipped by THIS process (DataLoader workers keep their own; use batch['num_skipped'])."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict | None:
        record = self.source[i]
        images = decode_pair(record, i, self.on_corrupt)
        if images is None:
            self.num_corrupt += 1
            return None
        img_w, img_l = images
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, i))
        out = self.transform(img_w, img_l, generator)
        return {
            "pixel_values": out["pixel_values"],  # (2, 3, R, R): row 0 chosen, row 1 rejected
            "prompt": record.prompt,
            "original_size": out["original_size"],
            "crop_top_left": out["crop_top_left"],
            "index": i,
        }


def _short(ref: ImageRef) -> str:
    return str(ref) if isinstance(ref, (str, Path)) else "bytes"


def collate_pairs(items: list[dict | None]) -> dict:
    """Stack PairDataset items into the raw batch of docs/architecture.md; None items (corrupt pairs)
    are dropped and counted in `num_skipped`. If every item is None the batch has B = 0 and
    pixel_values of shape (0, 2, 3, 0, 0) (the resolution is unknown): the trainer skips it."""
    kept = [item for item in items if item is not None]
    num_skipped = len(items) - len(kept)
    if not kept:
        return {
            "pixel_values": torch.zeros(0, 2, 3, 0, 0),
            "prompts": [],
            "original_size": torch.zeros(0, 2, 2, dtype=torch.int64),
            "crop_top_left": torch.zeros(0, 2, 2, dtype=torch.int64),
            "indices": torch.zeros(0, dtype=torch.int64),
            "num_skipped": num_skipped,
        }
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),  # (B, 2, 3, R, R)
        "prompts": [item["prompt"] for item in kept],
        "original_size": torch.stack([item["original_size"] for item in kept]),  # (B, 2, 2)
        "crop_top_left": torch.stack([item["crop_top_left"] for item in kept]),  # (B, 2, 2)
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.int64),
        "num_skipped": num_skipped,
    }


class ImageDataset(PairDataset):
    """Labelled single images (a labelled PairSource, data.sources.labelled): item i is one decoded, transformed
    image with its label; seeded and skipped like PairDataset's pairs."""

    def __getitem__(self, i: int) -> dict | None:
        record: ImageRecord = self.source[i]
        try:
            img = decode_image(record.image, f"{record.key} (image: {_short(record.image)})")
        except CorruptImageError as err:
            if self.on_corrupt == "error":
                raise CorruptImageError(f"{err}. Set data.on_corrupt=skip to skip and count such images.") from err
            log.warning("skipping image %d: %s", i, err)
            self.num_corrupt += 1
            return None
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, i))
        out = self.transform.single(img, generator)
        return {**out, "prompt": record.prompt, "desirable": record.desirable, "index": i}


def collate_images(items: list[dict | None]) -> dict:
    """Stack ImageDataset items: pixel_values (B, 3, R, R), desirable bool (B,), original_size and crop_top_left
    (B, 2), prompts, indices, num_skipped (None items, corrupt images, dropped and counted)."""
    kept = [item for item in items if item is not None]
    out = {"prompts": [item["prompt"] for item in kept], "num_skipped": len(items) - len(kept),
           "indices": torch.tensor([item["index"] for item in kept], dtype=torch.int64),
           "desirable": torch.tensor([item["desirable"] for item in kept], dtype=torch.bool)}
    if not kept:
        return {**out, "pixel_values": torch.zeros(0, 3, 0, 0), "original_size": torch.zeros(0, 2, dtype=torch.int64),
                "crop_top_left": torch.zeros(0, 2, dtype=torch.int64)}
    return {**out, **{k: torch.stack([item[k] for item in kept]) for k in ("pixel_values", "original_size",
                                                                            "crop_top_left")}}
