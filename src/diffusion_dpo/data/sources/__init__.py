"""Preference-pair sources: every supported input normalised to an indexable sequence of PairRecord.

    source = open_source(cfg.data)      # pickapic (hub id, parquet, saved folder), manifest, folders
    record = source[0]                  # PairRecord(prompt, chosen, rejected, key, meta), images still encoded
    source.fingerprint                  # cache key: hash of exactly what determines the pairs
    source.stats                        # {"rows_read": ..., "ties_dropped": ..., "pairs": ...}

Sources are lazy: Pick-a-Pic-style data stays in a memory-mapped Arrow table (the `datasets` cache) and
manifests/folders hold only paths, so indexing 850k pairs never loads their images. Nothing is dropped
silently: tied rows, pairs beyond `max_pairs` and missing image files are counted in `stats`, logged,
and shown by `describe()`. Corrupt or missing images are skipped (or raise) at decode time, in
`data.dataset.PairDataset`, according to `data.on_corrupt`. Data that yields no pair at all is an error
here, for every command.

One reader per format, each a module of this package: `arrow` (Pick-a-Pic tables: hub id, parquet, saved
folder), `manifest`, `folders`, `labelled` (single images with a desirable/undesirable label, and data.unpair,
which turns any pair source into them); `base` holds what they share. This module picks the reader
(`detect_format`, the closed `OPENERS` table) and checks that the pairs can fill a batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.sources.arrow import open_hub, open_parquet, open_saved
from diffusion_dpo.data.sources.base import GLOB_CHARS, MANIFEST_SUFFIXES, PairSource
from diffusion_dpo.data.sources.folders import open_folders
from diffusion_dpo.data.sources.labelled import UnpairedSource, open_any_manifest, open_labelled
from diffusion_dpo.errors import DataError

__all__ = ["OPENERS", "PairSource", "check_fills_batch", "detect_format", "open_source"]

log = logging.getLogger("diffusion_dpo")

OPENERS: dict[str, Callable[[DataConfig], PairSource]] = {
    "pickapic:hub": open_hub,
    "pickapic:parquet": open_parquet,
    "pickapic:saved": open_saved,
    "manifest": open_any_manifest,  # a pair manifest, or a labelled one (image, label columns)
    "labelled": open_labelled,
    "folders": open_folders,
}
"""detect_format's answer -> the reader that opens it."""


def _looks_like_hub_id(source: str) -> bool:
    """'owner/name' with no path-like features (the source was already found not to exist locally)."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
            and not GLOB_CHARS & set(source) and Path(source).suffix == "")


def detect_format(cfg: DataConfig) -> str:
    """'pickapic:hub' / 'pickapic:parquet' / 'pickapic:saved' / 'manifest' / 'folders' for data.source."""
    source, fmt = cfg.source, cfg.format
    if not source:
        raise DataError("data.source is empty; set it to a parquet file, a manifest, a folder pair or a hub dataset id")
    path = Path(source)
    if fmt == "cache":
        raise DataError("data.format=cache: a prepared latent cache is read by diffusion_dpo.cache (CachedPairDataset), "
                        "not by data.sources.open_source; use diffusion_dpo.cache for it")
    if path.is_dir():
        if fmt in ("auto", "folders") and (path / "chosen").is_dir() and (path / "rejected").is_dir():
            return "folders"
        if fmt in ("auto", "pickapic"):
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                return "pickapic:saved"
            if any(path.glob("*.parquet")):
                return "pickapic:parquet"
        raise DataError(f"data.source {source!r} is a folder but not one this toolkit reads as format {fmt!r}: expected chosen/ "
                        "and rejected/ subfolders (folders), a datasets save_to_disk folder, or *.parquet files (pickapic)")
    if path.is_file():
        if path.suffix == ".parquet" and fmt in ("auto", "pickapic"):
            return "pickapic:parquet"
        if path.suffix in MANIFEST_SUFFIXES and fmt in ("auto", "manifest", "labelled"):
            return "labelled" if fmt == "labelled" else "manifest"
        raise DataError(f"data.source {source!r}: cannot read a {path.suffix or 'suffix-less'} file as format {fmt!r}; "
                        "use a .parquet file (pickapic) or a .jsonl/.json/.csv manifest")
    if path.exists():  # neither file nor folder: a FIFO or device, which would block the reader
        raise DataError(f"data.source {source!r} is not a regular file or folder (a FIFO or device); point it to a file or folder")
    if GLOB_CHARS & set(source) and fmt in ("auto", "pickapic"):
        return "pickapic:parquet"
    if _looks_like_hub_id(source) and fmt in ("auto", "pickapic"):
        return "pickapic:hub"
    raise DataError(f"data.source not found: {source!r} (no such file or folder{'' if path.is_absolute() else f' under {Path.cwd()}'})")


def open_source(cfg: DataConfig) -> PairSource:
    """Open `cfg.source` as a PairSource; raise DataError naming the problem and the fix."""
    source = OPENERS[detect_format(cfg)](cfg)
    if cfg.unpair:
        if source.labelled:
            raise DataError(f"data.unpair=true, but {source.location} already holds labelled single images; "
                            "unset data.unpair")
        source = UnpairedSource(source)
    log.info("data: %s", source.describe())
    if len(source) == 0:
        s = source.stats
        why = (f"every one of its {s['rows_read']} rows is a tie (label_0 == 0.5), which has no winner" if s.get("ties_dropped")
               else "it has no rows")
        raise DataError(f"{source.kind} {source.location} gives no preference pairs: {why}; point data.source to data "
                        "with decisive pairs")
    return source


def check_fills_batch(num_pairs: int, batch_size: int, num_processes: int, stats: dict[str, int] | None = None) -> None:
    """One global micro-batch takes train.batch_size pairs per process (train.pair_order drops an incomplete one), so
    fewer pairs than that can never train. `stats`, a source's counts, says where pairs went (ties, max_pairs)."""
    need = batch_size * num_processes
    if num_pairs >= need:
        return
    counts = ""
    if stats:
        counts = f" ({stats['rows_read']} rows read, {stats.get('ties_dropped', 0)} ties dropped, " \
                 f"{stats.get('beyond_max_pairs', 0)} beyond data.max_pairs)"
    raise DataError(f"{num_pairs} pairs{counts} cannot fill one micro-batch of train.batch_size {batch_size} x "
                    f"{num_processes} process(es) = {need} pairs: lower train.batch_size, or use more pairs "
                    "(raise data.max_pairs or add data)")
