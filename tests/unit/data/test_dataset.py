"""decode_image, PairDataset (corrupt handling, seeding) and collate_pairs (the raw-batch contract)."""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.dataset import PairDataset, collate_pairs, decode_image
from diffusion_dpo.data.sources import open_source
from diffusion_dpo.data.synthetic import synthetic_pairs, write_manifest, write_pickapic_parquet
from diffusion_dpo.data.transforms import PairTransform
from diffusion_dpo.errors import CorruptImageError


def _dataset(source_path, on_corrupt="skip", **transform_kw):
    source = open_source(DataConfig(source=str(source_path)))
    return PairDataset(source, PairTransform(32, **transform_kw), seed=0, on_corrupt=on_corrupt)


def test_decode_image_bytes_and_paths(tmp_path):
    data = synthetic_pairs(1, size=(40, 48))[0].chosen
    (tmp_path / "a.jpg").write_bytes(data)
    for ref in (data, tmp_path / "a.jpg", str(tmp_path / "a.jpg")):
        img = decode_image(ref)
        assert img.mode == "RGB" and img.size == (48, 40)


def test_decode_image_composites_transparency_onto_white():
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_errors_name_the_image(tmp_path):
    data = synthetic_pairs(1)[0].chosen
    with pytest.raises(CorruptImageError, match=r"cannot decode image row7"):
        decode_image(data[: len(data) // 2], "row7")  # truncated JPEG: caught only because of img.load()
    with pytest.raises(CorruptImageError, match=r"cannot decode image <9 image bytes>"):
        decode_image(b"not a jpg")
    with pytest.raises(CorruptImageError, match=r"image file not found: .*missing.png"):
        decode_image(tmp_path / "missing.png")


def _png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): color type 0 gray, 2 RGB; values (H, W[, C])."""
    height, width = values.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_16_bit_gray_png_is_scaled_not_clipped():
    # value * 255 / 65535 = value / 257, rounded half up, worked out by hand:
    # 0 -> 0; 257 -> 1; 1000 -> 3.891 -> 4; 32768 -> 127.502 -> 128; 40000 -> 155.64 -> 156; 65535 -> 255
    values = np.array([[0, 257, 1000], [32768, 40000, 65535]], dtype=np.uint16)
    img = decode_image(_png16(values, color_type=0))
    assert img.mode == "RGB" and img.size == (3, 2)
    expected = np.array([[0, 1, 4], [128, 156, 255]], dtype=np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(img)[..., channel], expected)
    # the same through PIL's own 16-bit writer (mode I;16) and a big-endian raw mode
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(decode_image(buf.getvalue()))[..., 0], expected)
    big_endian = Image.frombytes("I;16B", (3, 2), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(decode_image(_png_bytes(big_endian)))[..., 0], expected)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_rgb_png_keeps_its_colours():
    values = np.array([[[0, 257, 65535], [32768, 1000, 60000]]], dtype=np.uint16)  # (1, 2, 3)
    img = np.asarray(decode_image(_png16(values, color_type=2))).astype(int)
    # PIL keeps each channel's high byte (value // 256), within 1 of value * 255 / 65535; nothing clipped
    assert np.abs(img - values / 257.0).max() <= 1.0
    assert img.tolist() == [[[0, 1, 255], [128, 3, 234]]]


@pytest.mark.fault(input="integer (mode I) or floating-point (mode F) image of unknown range",
                   behaviour="the pair is skipped or an error (`data.on_corrupt`): names the image and the mode")
def test_images_of_unknown_range_are_refused():
    def tiff(values: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(values).save(buf, format="TIFF")
        return buf.getvalue()

    with pytest.raises(CorruptImageError, match=r"row3 has integer pixels outside 0..65535 \(PIL mode I, range 0..70000\)"):
        decode_image(tiff(np.array([[0, 70000]], dtype=np.int32)), "row3")
    with pytest.raises(CorruptImageError, match=r"floating-point pixels \(PIL mode F\)"):
        decode_image(tiff(np.array([[0.5, 2.0]], dtype=np.float32)))
    # mode I within 0..65535 (older Pillow opens 16-bit PNGs so) is scaled like I;16: 32768 -> 128
    assert decode_image(tiff(np.array([[32768, 65535]], dtype=np.int32))).getpixel((0, 0)) == (128, 128, 128)


def _unblock_fifo_readers(fifo: Path, seconds: float = 3.0) -> None:
    """Open `fifo` for writing without blocking, again and again, so a reader stuck in open() gets EOF and the
    test fails instead of hanging (open with O_NONBLOCK fails with ENXIO while nobody reads)."""
    def loop():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            time.sleep(0.05)
    threading.Thread(target=loop, daemon=True).start()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.fault(input="image path that is a FIFO, device or folder (decoding)",
                   behaviour="refused at once, naming the path (never blocks)")
def test_decode_image_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    _unblock_fifo_readers(fifo)
    for ref in (fifo, tmp_path):
        with pytest.raises(CorruptImageError, match=r"is not a regular file \(a FIFO, device or folder\)"):
            decode_image(ref)


def test_items_follow_the_contract_and_the_synthetic_rule(tmp_path):
    dataset = _dataset(write_pickapic_parquet(tmp_path / "t.parquet", n=4))
    item = dataset[2]
    assert item["pixel_values"].shape == (2, 3, 32, 32)
    assert item["prompt"] == synthetic_pairs(4)[2].prompt and item["index"] == 2
    assert item["original_size"].tolist() == [[40, 48], [40, 48]]
    for i in range(len(dataset)):  # "bright" rule: the chosen image is brighter, whichever column held it
        pixels = dataset[i]["pixel_values"]
        assert pixels[0].mean() > pixels[1].mean() + 0.5


def test_corrupt_pairs_are_skipped_counted_and_logged(tmp_path, caplog):
    dataset = _dataset(write_pickapic_parquet(tmp_path / "t.parquet", n=6, corrupt=2))
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(item is None for item in items) == 2 and dataset.num_corrupt == 2
    assert caplog.text.count("skipping pair") == 2 and "cannot decode image row" in caplog.text
    batch = collate_pairs(items)
    assert batch["num_skipped"] == 2 and batch["pixel_values"].shape[0] == 4
    assert batch["indices"].tolist() == [i for i, item in enumerate(items) if item is not None]


def test_corrupt_pair_is_an_error_when_asked(tmp_path):
    dataset = _dataset(write_pickapic_parquet(tmp_path / "t.parquet", n=3, corrupt=3), on_corrupt="error")
    with pytest.raises(CorruptImageError, match=r"cannot decode image row0 .*on_corrupt=skip"):
        dataset[0]


def test_missing_manifest_file_is_skipped_or_an_error(tmp_path):
    path = write_manifest(tmp_path, 3, missing=1)
    skipping = _dataset(path)
    assert sum(skipping[i] is None for i in range(3)) == 1 and skipping.num_corrupt == 1
    strict = _dataset(path, on_corrupt="error")
    with pytest.raises(CorruptImageError, match=r"image file not found"):
        [strict[i] for i in range(3)]


def test_items_are_seeded_by_seed_epoch_and_index(tmp_path):
    path = write_pickapic_parquet(tmp_path / "t.parquet", n=4, size=(32, 96))  # wide: 65 crop positions
    dataset = _dataset(path, crop="random", random_flip=True)
    first = [dataset[i]["crop_top_left"] for i in range(4)]
    assert all(torch.equal(a, dataset[i]["crop_top_left"]) for i, a in enumerate(first))  # repeatable
    dataset.set_epoch(1)
    assert any(not torch.equal(a, dataset[i]["crop_top_left"]) for i, a in enumerate(first))  # new epoch, new draws
    other_seed = PairDataset(dataset.source, dataset.transform, seed=1)
    assert any(not torch.equal(a, other_seed[i]["crop_top_left"]) for i, a in enumerate(first))


def test_collate_stacks_the_raw_batch(tmp_path):
    dataset = _dataset(write_pickapic_parquet(tmp_path / "t.parquet", n=3))
    batch = collate_pairs([dataset[0], None, dataset[2]])
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["original_size"].shape == (2, 2, 2) and batch["original_size"].dtype == torch.int64
    assert batch["crop_top_left"].shape == (2, 2, 2) and batch["crop_top_left"].dtype == torch.int64
    assert batch["indices"].tolist() == [0, 2] and batch["num_skipped"] == 1
    assert batch["prompts"] == [dataset[0]["prompt"], dataset[2]["prompt"]]
    assert set(batch) == {"pixel_values", "prompts", "original_size", "crop_top_left", "indices", "num_skipped"}


def test_collate_of_only_corrupt_pairs_is_an_empty_batch():
    batch = collate_pairs([None, None])
    assert batch["num_skipped"] == 2 and batch["prompts"] == []
    assert batch["pixel_values"].shape[0] == 0 and batch["indices"].shape == (0,)
    assert batch["original_size"].shape == (0, 2, 2) and batch["crop_top_left"].shape == (0, 2, 2)


def test_works_with_a_dataloader(tmp_path):
    dataset = _dataset(write_pickapic_parquet(tmp_path / "t.parquet", n=5, corrupt=1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_pairs)
    batches = list(loader)
    assert sum(b["pixel_values"].shape[0] for b in batches) == 4 and sum(b["num_skipped"] for b in batches) == 1
