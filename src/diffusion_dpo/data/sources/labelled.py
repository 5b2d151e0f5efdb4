"""Labelled single images (Diffusion-KTO's data): a manifest of (prompt, image, label), and pairs turned into
labelled singles (data.unpair).

    source = open_labelled(cfg)          # .jsonl / .json / .csv rows {prompt, image, label, ...}
    source = UnpairedSource(pairs)       # any PairSource: winner desirable, loser undesirable
    source[i]                            # ImageRecord(prompt, image, desirable, key, meta)

A manifest with the columns `image` and `label` (and no `chosen`) is read as labelled under data.format=auto;
data.format=labelled insists on it. Labels: desirable / undesirable, 1 / 0, true / false (any case; CSV
gives them as text). Opened through `data.sources.open_source`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.records import ImageRecord
from diffusion_dpo.data.sources.base import MANIFEST_SUFFIXES, PairSource, PathPairSource, cap_pairs, file_stat, stat_images
from diffusion_dpo.data.sources.manifest import open_manifest, read_manifest_rows
from diffusion_dpo.errors import DataError

log = logging.getLogger("diffusion_dpo")

IMAGE_COLUMNS = ("prompt", "image", "label")
LABELS = {"desirable": True, "undesirable": False, "1": True, "0": False, "true": True, "false": False}
"""Accepted label spellings (compared lower-cased and stripped) -> desirable."""


def parse_label(value, where: str) -> bool:
    """True for a desirable image, False for an undesirable one; anything else is a DataError naming `where`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in LABELS:
        return LABELS[text]
    raise DataError(f"{where}: label {value!r} is not one of desirable / undesirable, 1 / 0, true / false")


def is_labelled_row(row: dict) -> bool:
    return "image" in row and "label" in row and "chosen" not in row


def open_any_manifest(cfg: DataConfig) -> PairSource:
    """data.format=auto or manifest: a pair manifest, or a labelled one when its first row has image and label."""
    path = Path(cfg.source)
    rows = read_manifest_rows(path)
    if rows and is_labelled_row(rows[0][1]):
        return open_labelled(cfg, rows)
    return open_manifest(cfg, rows)


class LabelledSource(PathPairSource):
    """Labelled images whose files are paths (a labelled manifest)."""

    labelled = True

    def describe(self) -> str:
        s = self.stats
        text = super().describe().replace(f"{s['pairs']} pairs", f"{s['pairs']} labelled images "
                                          f"({s['desirable']} desirable, {s['pairs'] - s['desirable']} undesirable)", 1)
        return text.replace("pairs beyond", "images beyond")


def open_labelled(cfg: DataConfig, rows: list[tuple[int, dict]] | None = None) -> LabelledSource:
    path = Path(cfg.source)
    if path.suffix not in MANIFEST_SUFFIXES:
        raise DataError(f"{path}: a labelled manifest must be a .jsonl, .json or .csv file")
    rows = read_manifest_rows(path, IMAGE_COLUMNS) if rows is None else rows
    records = []
    for n, row in rows:
        where = f"{path} line {n}"
        missing = [c for c in IMAGE_COLUMNS if row.get(c) is None]
        if missing:
            raise DataError(f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(row) or '(none)'}; a "
                            f"labelled manifest has {', '.join(IMAGE_COLUMNS)} (or, for pairs, prompt, chosen, rejected)")
        if not str(row["image"]).strip():
            raise DataError(f"{where}: empty image path in column image")
        meta = {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}
        records.append(ImageRecord(str(row["prompt"]), str(path.parent / row["image"]), parse_label(row["label"], where),
                                   f"line{n}", meta))
    stats = {"rows_read": len(records), "ties_dropped": 0}
    records = records[: cap_pairs(len(records), cfg.max_pairs, stats)]  # data.max_pairs counts images here
    stats["desirable"] = sum(r.desirable for r in records)
    images, stats["missing_files"] = stat_images(records, str(path))
    if stats["missing_files"]:
        log.warning("%s: %d referenced image files do not exist; they will be %s at decode time (data.on_corrupt=%s)",
                    path, stats["missing_files"], "skipped and counted" if cfg.on_corrupt == "skip" else "an error",
                    cfg.on_corrupt)
    parts = {"format": "labelled", "files": [file_stat(path)] + images, "images": len(records)}
    return LabelledSource("labelled manifest", str(path), records, parts, stats)


class UnpairedSource(PairSource):
    """data.unpair: each pair of `pairs` becomes two labelled images, its winner desirable (index 2i) and its loser
    undesirable (2i + 1), each trained as its own sample (own noise, timestep and caption dropout)."""

    labelled = True

    def __init__(self, pairs: PairSource):
        stats = {**pairs.stats, "pairs": 2 * len(pairs), "desirable": len(pairs)}
        super().__init__(f"{pairs.kind} (unpaired)", pairs.location,
                         {"unpaired": pairs.fingerprint}, stats)
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i: int) -> ImageRecord:
        record = self.pairs[i // 2]
        desirable = i % 2 == 0
        return ImageRecord(record.prompt, record.chosen if desirable else record.rejected, desirable,
                           f"{record.key}/{'chosen' if desirable else 'rejected'}", record.meta)

    def describe(self) -> str:
        return (f"{self.pairs.describe()}; data.unpair: {len(self)} labelled images (each winner desirable, each loser "
                f"undesirable) [fingerprint {self.fingerprint}]")
