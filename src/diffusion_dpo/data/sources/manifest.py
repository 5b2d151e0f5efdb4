"""Manifest sources: a JSONL, JSON (list of objects) or CSV file of rows {prompt, chosen, rejected, ...}, the
image paths relative to the manifest's folder (or absolute). Columns other than the three are kept as meta.

    source = open_manifest(cfg)

Opened through `data.sources.open_source`, which picks the format.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.records import PairRecord
from diffusion_dpo.data.sources.base import (MANIFEST_SUFFIXES, PAIR_COLUMNS, PathPairSource, cap_pairs, file_stat,
                                             parse_json, read_text, stat_images)
from diffusion_dpo.errors import DataError

log = logging.getLogger("diffusion_dpo")


def read_manifest_rows(path: Path, columns: tuple[str, ...] = PAIR_COLUMNS) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a JSONL, JSON (list of objects) or CSV manifest; `columns`: the keys the
    rows should have, for the messages."""
    text = read_text(path)
    if path.suffix == ".csv":
        # newline="": quoted fields may hold line breaks; reader.line_num is the line a row ends on
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return [(reader.line_num, dict(row)) for row in reader]
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from err
    if path.suffix == ".json":
        rows = parse_json(text, str(path))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a .json manifest must be a list of objects with keys {', '.join(columns)}")
        return list(enumerate(rows, start=1))
    out = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): a prompt may hold U+2028 etc.
        if not line.strip():
            continue
        row = parse_json(line, f"{path} line {n}")
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object with keys {', '.join(columns)}")
        out.append((n, row))
    return out


def open_manifest(cfg: DataConfig, rows: list[tuple[int, dict]] | None = None) -> PathPairSource:
    """A pair manifest; `rows`: already read by read_manifest_rows (data.sources.labelled tells the two kinds of
    manifest apart by their columns)."""
    path = Path(cfg.source)
    if path.suffix not in MANIFEST_SUFFIXES:
        raise DataError(f"{path}: a manifest must be a .jsonl, .json or .csv file")
    rows = read_manifest_rows(path) if rows is None else rows
    records = []
    for n, row in rows:
        missing = [c for c in PAIR_COLUMNS if row.get(c) is None]  # a short CSV row gives None too
        if missing:
            raise DataError(f"{path} line {n}: missing column(s) {', '.join(missing)}; found {', '.join(row) or '(none)'}; "
                            f"expected {', '.join(PAIR_COLUMNS)} (image paths relative to the manifest's folder, or absolute)")
        empty = [c for c in ("chosen", "rejected") if not str(row[c]).strip()]
        if empty:
            raise DataError(f"{path} line {n}: empty image path in column(s) {', '.join(empty)}")
        chosen, rejected = (str(path.parent / row[c]) for c in ("chosen", "rejected"))  # absolute paths stay as they are
        meta = {k: v for k, v in row.items() if k not in PAIR_COLUMNS}
        records.append(PairRecord(str(row["prompt"]), chosen, rejected, f"line{n}", meta))
    stats = {"rows_read": len(records), "ties_dropped": 0}
    records = records[: cap_pairs(len(records), cfg.max_pairs, stats)]
    images, stats["missing_files"] = stat_images(records, str(path))
    if stats["missing_files"]:
        log.warning("%s: %d referenced image files do not exist; their pairs will be %s at decode time (data.on_corrupt=%s)",
                    path, stats["missing_files"], "skipped and counted" if cfg.on_corrupt == "skip" else "an error", cfg.on_corrupt)
    parts = {"format": "manifest", "files": [file_stat(path)] + images, "pairs": len(records)}
    return PathPairSource("manifest", str(path), records, parts, stats)
