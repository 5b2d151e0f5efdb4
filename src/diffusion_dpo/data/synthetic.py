"""Small synthetic preference datasets in every supported format (tests, docs, demo).

Every writer draws the same pairs from `synthetic_pairs(n, seed, ...)`, so the same (n, seed) written as
Pick-a-Pic parquet, a manifest or two folders holds byte-identical images and the same prompts in the
same order. Winner and loser differ SYSTEMATICALLY by a `rule` (default "bright": the preferred image
is bright, the rejected one dark), so a training test can check that a model learns the preference.

    write_pickapic_parquet(tmp / "train.parquet", n=16, seed=0, ties=2, corrupt=1)
    write_manifest(tmp / "manifest_set", n=16, fmt="csv")
    write_folders(tmp / "folder_set", n=16)
    write_labelled_manifest(tmp / "kto_set", n=16)     # unpaired (prompt, image, label) rows
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Rule = Literal["bright", "dark", "warm"]
RULES: dict[str, str] = {
    "bright": "the preferred image is bright, the rejected one dark",
    "dark": "the preferred image is dark, the rejected one bright",
    "warm": "the preferred image is tinted red, the rejected one blue",
}

# Words a tiny test tokenizer knows (tests/conftest.py WORDS), so prompts tokenize without unknowns.
_SIZES = ["small", "large"]
_COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
_SHAPES = ["circle", "square"]


@dataclass(frozen=True)
class SyntheticPair:
    prompt: str
    chosen: bytes
    rejected: bytes


def _render(rng: np.random.Generator, prompt_parts: tuple[str, str, str], size: tuple[int, int]) -> np.ndarray:
    """A float image in [0, 1] of shape (H, W, 3): smooth random background plus the prompt's shape."""
    h, w = size
    coarse = rng.random((4, 4, 3))
    background = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))
    img = Image.fromarray(background)
    shape_size, color, shape = prompt_parts
    r = int(min(h, w) * (0.35 if shape_size == "large" else 0.18))
    cy, cx = int(rng.integers(r, h - r + 1)), int(rng.integers(r, w - r + 1))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=_COLORS[color])
    return np.asarray(img, dtype=np.float32) / 255.0


def _apply_rule(img: np.ndarray, rule: Rule, preferred: bool) -> np.ndarray:
    if rule == "bright" or rule == "dark":
        bright = preferred == (rule == "bright")
        return 0.55 + 0.45 * img if bright else 0.45 * img
    if rule == "warm":
        tint = np.array([1.0, 0.6, 0.4] if preferred else [0.4, 0.6, 1.0], dtype=np.float32)
        return img * tint
    raise ValueError(f"unknown synthetic rule {rule!r}; choose one of {sorted(RULES)}")


def _encode(img: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).save(buf, format=image_format, quality=90)
    return buf.getvalue()


def synthetic_pairs(n: int, seed: int = 0, size: tuple[int, int] = (40, 48), rule: Rule = "bright",
                    image_format: str = "JPEG") -> list[SyntheticPair]:
    """`n` pairs; `size` is (height, width). Winner and loser show the same prompt, scene and shape."""
    if rule not in RULES:
        raise ValueError(f"unknown synthetic rule {rule!r}; choose one of {sorted(RULES)}")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        parts = (str(rng.choice(_SIZES)), str(rng.choice(list(_COLORS))), str(rng.choice(_SHAPES)))
        prompt = f"a photo of a {parts[0]} {parts[1]} {parts[2]}"
        scene = _render(rng, parts, size)
        pairs.append(SyntheticPair(prompt, _encode(_apply_rule(scene, rule, True), image_format),
                                   _encode(_apply_rule(scene, rule, False), image_format)))
    return pairs


def _truncate(data: bytes) -> bytes:
    """Corrupt image bytes the way an interrupted download does: keep only the first half."""
    return data[: len(data) // 2]


def _corrupt_slots(rng: np.random.Generator, n: int, corrupt: int) -> dict[int, int]:
    """{pair index: which image (0 chosen, 1 rejected)} for `corrupt` distinct pairs."""
    if not 0 <= corrupt <= n:
        raise ValueError(f"corrupt must be between 0 and n={n}, got {corrupt}")
    return {int(i): int(rng.integers(2)) for i in rng.choice(n, size=corrupt, replace=False)}


def write_pickapic_parquet(path: str | Path, n: int, seed: int = 0, ties: int = 0, corrupt: int = 0,
                           size: tuple[int, int] = (40, 48), rule: Rule = "bright") -> Path:
    """Parquet with Pick-a-Pic v2 columns: caption, jpg_0, jpg_1, label_0, label_1, ranking_id, model_0, model_1.

    `n` decisive pairs (in `synthetic_pairs` order) with the winner in a random column (label_0 1 or 0),
    plus `ties` extra rows labelled 0.5 at random positions, and `corrupt` decisive pairs whose chosen or
    rejected JPEG is truncated.
    """
    rng = np.random.default_rng(seed + 1)
    pairs = synthetic_pairs(n, seed, size, rule)
    broken = _corrupt_slots(rng, n, corrupt)
    rows = []
    for i, pair in enumerate(pairs):
        images = [pair.chosen, pair.rejected]
        if i in broken:
            images[broken[i]] = _truncate(images[broken[i]])
        winner_first = bool(rng.integers(2))
        jpg_0, jpg_1 = images if winner_first else images[::-1]
        label_0 = 1.0 if winner_first else 0.0
        rows.append({"caption": pair.prompt, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0, "label_1": 1.0 - label_0})
    tie_pairs = synthetic_pairs(ties, seed + 10_000, size, rule)
    for tie in tie_pairs:
        position = int(rng.integers(len(rows) + 1))
        rows.insert(position, {"caption": tie.prompt, "jpg_0": tie.chosen, "jpg_1": tie.rejected, "label_0": 0.5, "label_1": 0.5})
    for i, row in enumerate(rows):
        row.update(ranking_id=i, model_0=f"model-{i % 2}", model_1=f"model-{(i + 1) % 2}")

    import pyarrow as pa  # lazy: only the writers need pyarrow directly
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_pair_images(folder: Path, name: str, pair: SyntheticPair, broken_side: int | None,
                       chosen_dir: str, rejected_dir: str) -> tuple[Path, Path]:
    chosen, rejected = folder / chosen_dir / f"{name}.jpg", folder / rejected_dir / f"{name}.jpg"
    chosen.parent.mkdir(parents=True, exist_ok=True)
    rejected.parent.mkdir(parents=True, exist_ok=True)
    chosen.write_bytes(_truncate(pair.chosen) if broken_side == 0 else pair.chosen)
    rejected.write_bytes(_truncate(pair.rejected) if broken_side == 1 else pair.rejected)
    return chosen, rejected


def write_manifest(folder: str | Path, n: int, fmt: Literal["jsonl", "csv"] = "jsonl", seed: int = 0,
                   corrupt: int = 0, missing: int = 0, size: tuple[int, int] = (40, 48),
                   rule: Rule = "bright", columns: dict[str, list] | None = None) -> Path:
    """`folder/manifest.{fmt}` with columns prompt, chosen, rejected (paths relative to `folder`, under
    images/) and an extra `pair_id` column (carried into PairRecord.meta); `columns`: more columns, one value per
    pair (None: that row lacks it), e.g. pref_prob or margin for soft labels. `missing` pairs reference a
    rejected file that is never written; `corrupt` pairs have a truncated image. Returns the manifest path."""
    folder = Path(folder)
    rng = np.random.default_rng(seed + 2)
    pairs = synthetic_pairs(n, seed, size, rule)
    broken = _corrupt_slots(rng, n, corrupt)
    absent = {int(i) for i in rng.choice(sorted(set(range(n)) - set(broken)), size=missing, replace=False)} if missing else set()
    rows = []
    for i, pair in enumerate(pairs):
        name = f"pair{i:05d}"
        chosen, rejected = _write_pair_images(folder, name, pair, broken.get(i), "images/chosen", "images/rejected")
        if i in absent:
            rejected.unlink()
        rows.append({"prompt": pair.prompt, "chosen": chosen.relative_to(folder).as_posix(),
                     "rejected": rejected.relative_to(folder).as_posix(), "pair_id": name})
        rows[-1].update({k: v[i] for k, v in (columns or {}).items() if v[i] is not None})
    header = ["prompt", "chosen", "rejected", "pair_id", *(columns or {})] if rows else ["prompt", "chosen", "rejected"]
    return _write_rows(folder / f"manifest.{fmt}", rows, fmt, header)


def _write_rows(path: Path, rows: list[dict], fmt: str, fieldnames: list[str]) -> Path:
    """A manifest of `rows` as JSONL or CSV at `path`."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"fmt must be 'jsonl' or 'csv', got {fmt!r}")
    return path


def write_mixed_size_manifest(folder: str | Path, n: int, size: tuple[int, int] = (40, 48)) -> Path:
    """write_manifest with the losers transposed: winners (h, w) = `size`, losers (w, h), so the two images of a
    pair differ in size and orientation (SDXL size conditioning, shared pair geometry)."""
    from PIL import Image

    path = write_manifest(folder, n=n, size=size)
    for file in sorted((Path(folder) / "images" / "rejected").glob("*.jpg")):
        with Image.open(file) as img:
            img.load()
        img.resize((size[0], size[1])).save(file)  # PIL sizes are (w, h): the transposed shape
    return path


def write_labelled_manifest(folder: str | Path, n: int, fmt: Literal["jsonl", "csv"] = "jsonl", seed: int = 0,
                            size: tuple[int, int] = (40, 48), rule: Rule = "bright") -> Path:
    """`folder/labelled.{fmt}`: `n` UNPAIRED labelled images (columns prompt, image, label), from synthetic_pairs(n):
    pair i gives only its preferred image (label desirable) when i is even, only its rejected one (undesirable)
    when i is odd, so no prompt has both. Returns the manifest path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, pair in enumerate(synthetic_pairs(n, seed, size, rule)):
        desirable = i % 2 == 0
        image = folder / "images" / f"image{i:05d}.jpg"
        image.write_bytes(pair.chosen if desirable else pair.rejected)
        rows.append({"prompt": pair.prompt, "image": image.relative_to(folder).as_posix(),
                     "label": "desirable" if desirable else "undesirable"})
    return _write_rows(folder / f"labelled.{fmt}", rows, fmt, ["prompt", "image", "label"])


def write_folders(folder: str | Path, n: int, seed: int = 0, prompts_format: Literal["jsonl", "json", "tsv"] = "jsonl",
                  corrupt: int = 0, size: tuple[int, int] = (40, 48), rule: Rule = "bright") -> Path:
    """`folder/chosen/pairNNNNN.jpg`, `folder/rejected/pairNNNNN.jpg` and a prompts file
    (prompts.jsonl lines {"name", "prompt"}, prompts.json {name: prompt} or prompts.txt 'name<TAB>prompt').
    Returns `folder`."""
    folder = Path(folder)
    rng = np.random.default_rng(seed + 3)
    pairs = synthetic_pairs(n, seed, size, rule)
    broken = _corrupt_slots(rng, n, corrupt)
    prompts = {}
    for i, pair in enumerate(pairs):
        name = f"pair{i:05d}"
        _write_pair_images(folder, name, pair, broken.get(i), "chosen", "rejected")
        prompts[name] = pair.prompt
    if prompts_format == "jsonl":
        (folder / "prompts.jsonl").write_text("".join(json.dumps({"name": k, "prompt": v}) + "\n" for k, v in prompts.items()))
    elif prompts_format == "json":
        (folder / "prompts.json").write_text(json.dumps(prompts, indent=1))
    elif prompts_format == "tsv":
        (folder / "prompts.txt").write_text("".join(f"{k}\t{v}\n" for k, v in prompts.items()))
    else:
        raise ValueError(f"prompts_format must be 'jsonl', 'json' or 'tsv', got {prompts_format!r}")
    return folder
