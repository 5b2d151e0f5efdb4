"""Labelled single images (Diffusion-KTO's data): the (prompt, image, label) manifest, data.unpair, and the
dataset that decodes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.dataset import ImageDataset, collate_images
from diffusion_dpo.data.records import ImageRecord
from diffusion_dpo.data.sources import open_source
from diffusion_dpo.data.synthetic import synthetic_pairs, write_labelled_manifest, write_manifest
from diffusion_dpo.data.transforms import PairTransform
from diffusion_dpo.errors import ConfigError, DataError


def _open(source, **kw):
    return open_source(DataConfig(source=str(source), **kw))


def _refused(path: Path, content: str | bytes, match: str) -> None:
    """Write a manifest and check opening it raises one DataError matching `match`."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        _open(path)


def _images(folder: Path, n: int = 2) -> list[str]:
    pairs = synthetic_pairs(n)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i, pair in enumerate(pairs):
        (folder / "img" / f"{i}.jpg").write_bytes(pair.chosen)
        names.append(f"img/{i}.jpg")
    return names


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_labelled_manifest_reads_prompts_images_and_labels(tmp_path, fmt):
    path = write_labelled_manifest(tmp_path, n=5, fmt=fmt)
    source = _open(path)  # data.format=auto: image and label columns make it labelled
    assert source.labelled and len(source) == 5
    pairs = synthetic_pairs(5)
    for i in range(5):
        record = source[i]
        assert isinstance(record, ImageRecord)
        assert record.prompt == pairs[i].prompt
        assert record.desirable == (i % 2 == 0)  # the writer's rule: even rows desirable
        assert Path(record.image).read_bytes() == (pairs[i].chosen if i % 2 == 0 else pairs[i].rejected)
    assert source.stats["desirable"] == 3 and source.stats["pairs"] == 5
    assert "5 labelled images (3 desirable, 2 undesirable)" in source.describe()
    assert _open(path, format="labelled").fingerprint == source.fingerprint


def test_every_label_spelling_and_extra_columns(tmp_path):
    names = _images(tmp_path, 1)
    spellings = [("desirable", True), ("Undesirable", False), (1, True), (0, False), (True, True), (False, False),
                 ("TRUE", True), (" false ", False), ("1", True), ("0", False), (1.0, True)]
    rows = [{"prompt": "a red circle", "image": names[0], "label": label, "score": k} for k, (label, _) in enumerate(spellings)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = _open(path)
    assert [source[i].desirable for i in range(len(source))] == [want for _, want in spellings]
    assert source[3].meta == {"score": 3} and source[3].key == "line4"


@pytest.mark.fault(input="labelled manifest with a label other than desirable/undesirable, 1/0, true/false",
                   behaviour="error naming the file, the line and the value")
def test_a_bad_label_names_file_and_line(tmp_path):
    names = _images(tmp_path, 1)
    _refused(tmp_path / "m.csv", f"prompt,image,label\na,{names[0]},desirable\nb,{names[0]},0.5\n",
             r"m\.csv line 3: label '0\.5' is not one of desirable / undesirable")


@pytest.mark.fault(input="labelled manifest row without an image or label", behaviour="error naming the line and the columns")
def test_missing_columns_name_the_line(tmp_path):
    names = _images(tmp_path, 1)
    _refused(tmp_path / "m.jsonl", json.dumps({"prompt": "a", "image": names[0], "label": 1}) + "\n"
             + json.dumps({"prompt": "b", "image": names[0]}) + "\n", r"m\.jsonl line 2: missing column\(s\) label")
    # data.format=labelled on a pair manifest says what a labelled one needs
    pairs = write_manifest(tmp_path / "pairs", n=2)
    with pytest.raises(DataError, match=r"line 1: missing column\(s\) image, label"):
        _open(pairs, format="labelled")


@pytest.mark.fault(input="labelled manifest whose image is a FIFO", behaviour="error naming the manifest, the row and the path")
def test_a_fifo_image_is_refused_when_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "a", "image": "pipe.jpg", "label": "desirable"}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl, image line1: .*pipe\.jpg is not a regular file"):
        _open(path)


@pytest.mark.fault(input="labelled manifest that is not UTF-8", behaviour="error naming the file and the line")
def test_a_non_utf8_manifest_names_the_line(tmp_path):
    names = _images(tmp_path, 1)
    _refused(tmp_path / "m.csv", f"prompt,image,label\na,{names[0]},1\n".encode() + "caf\u00e9,".encode("latin1")
             + f"{names[0]},0\n".encode(), r"m\.csv line 3: not UTF-8 text")


def test_unpair_turns_each_pair_into_a_desirable_winner_and_an_undesirable_loser(tmp_path):
    pairs_path = write_manifest(tmp_path, n=3)
    pairs = _open(pairs_path)
    singles = _open(pairs_path, unpair=True)
    assert singles.labelled and len(singles) == 6 and singles.stats["desirable"] == 3
    for i in range(3):
        w, l = singles[2 * i], singles[2 * i + 1]
        assert (w.image, w.desirable, w.prompt) == (pairs[i].chosen, True, pairs[i].prompt)
        assert (l.image, l.desirable, l.prompt) == (pairs[i].rejected, False, pairs[i].prompt)
        assert (w.key, l.key) == (f"{pairs[i].key}/chosen", f"{pairs[i].key}/rejected")
    assert singles.fingerprint != pairs.fingerprint  # a cache key never confuses the two
    assert "data.unpair: 6 labelled images" in singles.describe()


@pytest.mark.fault(input="`data.unpair=true` on a labelled manifest", behaviour="error: the data is already labelled singles")
def test_unpair_on_labelled_data_is_refused(tmp_path):
    with pytest.raises(DataError, match="already holds labelled single images; unset data.unpair"):
        _open(write_labelled_manifest(tmp_path, n=2), unpair=True)


def test_image_dataset_decodes_transforms_and_skips_corrupt(tmp_path):
    path = write_labelled_manifest(tmp_path, n=3)
    (tmp_path / "images" / "image00001.jpg").write_bytes(b"not a jpeg")
    source = _open(path)
    transform = PairTransform(32, crop="random", random_flip=True)
    dataset = ImageDataset(source, transform, seed=5)
    batch = collate_images([dataset[i] for i in range(3)])
    assert batch["num_skipped"] == 1 and batch["indices"].tolist() == [0, 2]
    assert batch["desirable"].tolist() == [True, True]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["original_size"].tolist() == [[40, 48], [40, 48]]
    # the crop comes from the image's own seeded generator: the same item twice is the same tensor
    assert torch.equal(dataset[2]["pixel_values"], batch["pixel_values"][1])
    assert 0 <= batch["crop_top_left"][:, 1].min() and batch["crop_top_left"][:, 1].max() <= 48 * 32 // 40 - 32


@pytest.mark.fault(input="`prepare` (or `data.cache_dir`) with labelled single images",
                   behaviour="error: the cache stores pairs; train without data.cache_dir")
def test_prepare_refuses_labelled_images(tmp_path, tiny_sd):
    from diffusion_dpo.cache.prepare import locate_cache
    from diffusion_dpo.config import load_config

    for extra in ([f"data.source={write_labelled_manifest(tmp_path / 'l', n=2)}"],
                  [f"data.source={write_manifest(tmp_path / 'p', n=2)}", "data.unpair=true"]):
        cfg = load_config(None, [f"model.pretrained={tiny_sd}", "data.resolution=32", f"data.cache_dir={tmp_path / 'c'}",
                                 "train.method=kto", *extra])
        with pytest.raises(ConfigError, match="labelled single images .* the latent cache does not store"):
            locate_cache(cfg)
