"""Pick-a-Pic style tables read through Arrow: a hub dataset id, parquet files (a file, folder or glob), or a
folder written by `datasets`' save_to_disk. They share one path: a memory-mapped `datasets.Dataset` whose rows
stay encoded, so indexing 850k pairs never loads their images.

Two column layouts are read: Pick-a-Pic's (caption, jpg_0, jpg_1, label_0; ties dropped and counted) and plain
pairs (prompt, chosen, rejected with image bytes).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.records import ImageRef, PairRecord
from diffusion_dpo.data.sources.base import GLOB_CHARS, PAIR_COLUMNS, PairSource, cap_pairs, file_stat
from diffusion_dpo.errors import DataError

log = logging.getLogger("diffusion_dpo")

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PICKAPIC_META = ("label_1", "ranking_id", "user_id", "model_0", "model_1")
"""Optional Pick-a-Pic columns carried into PairRecord.meta when present."""


class ArrowPairSource(PairSource):
    """Rows of a memory-mapped `datasets.Dataset`; `rows[i]` is the table row of pair i (ties removed)."""

    def __init__(self, ds, layout: Literal["pickapic", "pairs"], rows: np.ndarray, location: str,
                 fingerprint_parts: dict, stats: dict[str, int]):
        super().__init__("pickapic", location, fingerprint_parts, stats)
        self._ds = ds
        self._layout = layout
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> PairRecord:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        row_index = int(self._rows[i])
        row = self._ds[row_index]
        if self._layout == "pairs":
            meta = {k: v for k, v in row.items() if k not in PAIR_COLUMNS}
            return PairRecord(row["prompt"], _image_ref(row["chosen"]), _image_ref(row["rejected"]), f"row{row_index}", meta)
        # label_0 == 1: jpg_0 is preferred (Pick-a-Pic convention); ties were removed when the source opened.
        first_wins = row["label_0"] == 1
        chosen, rejected = (row["jpg_0"], row["jpg_1"]) if first_wins else (row["jpg_1"], row["jpg_0"])
        meta = {k: row[k] for k in PICKAPIC_META if k in row}
        meta["label_0"] = row["label_0"]
        return PairRecord(row["caption"], _image_ref(chosen), _image_ref(rejected), f"row{row_index}", meta)

    def prompts(self) -> list[str]:
        """The prompt column alone, read through Arrow (reading whole rows would copy every image's bytes)."""
        table = self._ds.select_columns(["prompt" if self._layout == "pairs" else "caption"]).with_format("arrow")[:]
        return table.column(0).take(self._rows).to_pylist()


def _image_ref(value) -> ImageRef:
    """Raw bytes, or a `datasets.Image(decode=False)` cell {"bytes", "path"}. A null cell becomes empty
    bytes, which decoding reports as a corrupt image (counted, not silently dropped)."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") is not None else (value.get("path") or b"")
    return value if value is not None else b""


def _check_columns(columns: list[str], location: str) -> Literal["pickapic", "pairs"]:
    if all(c in columns for c in PICKAPIC_COLUMNS):
        return "pickapic"
    if all(c in columns for c in PAIR_COLUMNS):
        return "pairs"
    # Report against whichever layout the table resembles more.
    pickapic_missing = [c for c in PICKAPIC_COLUMNS if c not in columns]
    pairs_missing = [c for c in PAIR_COLUMNS if c not in columns]
    missing = pairs_missing if len(PAIR_COLUMNS) - len(pairs_missing) > len(PICKAPIC_COLUMNS) - len(pickapic_missing) else pickapic_missing
    raise DataError(
        f"{location}: missing column(s) {', '.join(missing)}; found columns {', '.join(columns) or '(none)'}. "
        f"Expected Pick-a-Pic columns {', '.join(PICKAPIC_COLUMNS)} (label_1 optional; label_0 = 1 means jpg_0 is "
        f"preferred, 0.5 a tie), or {', '.join(PAIR_COLUMNS)} with image bytes (chosen = preferred). "
        "Rename the columns, e.g. with datasets' Dataset.rename_column, or use data.format=manifest for image paths."
    )


def _labels(ds, column: str) -> np.ndarray:
    """One numeric column as float64 (nulls -> NaN), read from Arrow without touching the image columns."""
    import pyarrow as pa

    table = ds.select_columns([column]).with_format("arrow")[:]
    return table.column(0).cast(pa.float64()).to_numpy(zero_copy_only=False)


def _tie_filter(ds, drop_ties: bool, location: str, stats: dict[str, int]) -> np.ndarray:
    """Validate labels; return the row indices of decisive pairs. Ties are counted and logged."""
    label_0 = _labels(ds, "label_0")
    valid = np.isin(label_0, (0.0, 0.5, 1.0))
    if "label_1" in ds.column_names:
        valid &= np.isclose(label_0 + _labels(ds, "label_1"), 1.0)
    if not valid.all():
        bad = np.flatnonzero(~valid)
        raise DataError(
            f"{location}: {len(bad)} row(s) have labels that are not (label_0, label_1) = (1, 0), (0, 1) or (0.5, 0.5), "
            f"e.g. rows {bad[:5].tolist()} with label_0 {label_0[bad[:5]].tolist()}. Fix or remove these rows."
        )
    ties = label_0 == 0.5
    num_ties = int(ties.sum())
    if num_ties and not drop_ties:
        raise DataError(
            f"{location}: {num_ties} tied row(s) (label_0 == 0.5), e.g. rows {np.flatnonzero(ties)[:5].tolist()}; a tie has no "
            "winner, so it cannot be a preference pair. Set data.drop_ties=true (the default) to drop and count them."
        )
    stats["rows_read"] = len(label_0)
    stats["ties_dropped"] = num_ties
    if num_ties:
        log.info("%s: dropped %d tied rows (label_0 == 0.5) of %d (data.drop_ties=true)", location, num_ties, len(label_0))
    return np.flatnonzero(~ties)


def _arrow_source(ds, cfg: DataConfig, location: str, files: list, extra_parts: dict) -> ArrowPairSource:
    import datasets

    layout = _check_columns(list(ds.column_names), location)
    if layout == "pickapic":  # read only what a PairRecord needs; Pick-a-Pic has many more columns
        ds = ds.select_columns(list(PICKAPIC_COLUMNS) + [c for c in PICKAPIC_META if c in ds.column_names])
    # Keep images encoded: an Image feature would otherwise decode every accessed row into PIL here.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    stats: dict[str, int] = {}
    if layout == "pickapic":
        rows = _tie_filter(ds, cfg.drop_ties, location, stats)
    else:
        rows = np.arange(len(ds))
        stats.update(rows_read=len(ds), ties_dropped=0)
    rows = rows[: cap_pairs(len(rows), cfg.max_pairs, stats)]
    parts = {"format": "pickapic", "files": files, "drop_ties": cfg.drop_ties, "pairs": len(rows), **extra_parts}
    return ArrowPairSource(ds, layout, rows, location, parts, stats)


def _parquet_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
    elif GLOB_CHARS & set(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True))
    else:
        files = [path]
    if not files:
        raise DataError(f"data.source {source!r} matches no parquet files; check the path or glob pattern")
    not_parquet = [str(f) for f in files if f.suffix != ".parquet" or not f.is_file()]
    if not_parquet:
        raise DataError(f"data.source {source!r}: expected only .parquet files, got {not_parquet[:3]}")
    return files


def open_parquet(cfg: DataConfig) -> ArrowPairSource:
    import datasets

    files = _parquet_files(cfg.source)
    # load_dataset converts the parquet once into an Arrow file in the datasets cache, then memory-maps it,
    # so random access by row stays cheap however large the data.
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    return _arrow_source(ds, cfg, cfg.source, [file_stat(f) for f in files], {})


def open_saved(cfg: DataConfig) -> ArrowPairSource:
    import datasets

    folder = Path(cfg.source)
    try:
        ds = datasets.load_from_disk(str(folder))
    except FileNotFoundError as err:
        raise DataError(f"{folder} is not a folder written by datasets' save_to_disk ({err})") from err
    extra = {}
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"{folder}: no split {cfg.split!r}; available splits: {', '.join(ds)}. Set data.split.")
        ds = ds[cfg.split]
        extra["split"] = cfg.split
    files = [file_stat(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    return _arrow_source(ds, cfg, str(folder), files, extra)


def open_hub(cfg: DataConfig) -> ArrowPairSource:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    except (ConnectionError, FileNotFoundError) as err:
        from diffusion_dpo.runtime import datasets_offline  # imports torch: only on this error path

        offline = datasets_offline()
        why = "while offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set) and it is not in the local cache" if offline else f"({err})"
        raise DataError(
            f"data.source {cfg.source!r} is not a local file or folder, and the Hugging Face dataset {cfg.source!r} could not "
            f"be reached {why}. Pass local data instead: a parquet file or glob (data.source='data/train-*.parquet'), "
            "a folder written by Dataset.save_to_disk, a JSONL/CSV manifest, or a folder with chosen/ and rejected/ subfolders."
        ) from err
    except ValueError as err:  # e.g. an unknown split name
        raise DataError(f"hub dataset {cfg.source!r}, split {cfg.split!r}: {err}. Check data.split.") from err
    files = [file_stat(Path(f["filename"])) for f in ds.cache_files]
    return _arrow_source(ds, cfg, f"hub:{cfg.source}", files, {"hub_id": cfg.source, "split": cfg.split})
