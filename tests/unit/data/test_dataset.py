"""decode_image, PairDataset (corrupt handling, seeding) and collate_pairs (the raw-batch contract)."""

from __future__ import annotations

import io
import logging

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
