"""What every pair source shares: the PairSource base class, the data.max_pairs cap, file fingerprint entries,
and the text/stat helpers of the path-based readers (manifest, folders).

A source's `fingerprint` hashes exactly what determines its pairs (cache keys hash it): the readers build
the parts, `PairSource` hashes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from diffusion_dpo.data.records import PairRecord
from diffusion_dpo.errors import DataError

log = logging.getLogger("diffusion_dpo")

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
MANIFEST_SUFFIXES = {".jsonl", ".json", ".csv"}
GLOB_CHARS = set("*?[")


class PairSource:
    """An indexable, lazily read sequence of PairRecord with a fingerprint, counts and a description.

    `labelled` sources (data.sources.labelled) hold data.records.ImageRecord instead: single images with a
    desirable/undesirable label, which only losses that take labelled images (KTO) can train on."""

    labelled = False

    def __init__(self, kind: str, location: str, fingerprint_parts: dict, stats: dict[str, int]):
        self.kind = kind
        self.location = location
        self.stats = stats
        self._fingerprint = hashlib.sha256(json.dumps(fingerprint_parts, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> PairRecord:
        raise NotImplementedError

    def prompts(self) -> list[str]:
        """Every pair's prompt, in pair order, without decoding an image (the cache's prompt table: cache/prepare.py)."""
        return [self[i].prompt for i in range(len(self))]

    def describe(self) -> str:
        s = self.stats
        parts = [f"rows read {s['rows_read']}"]
        if s.get("ties_dropped"):
            parts.append(f"ties dropped {s['ties_dropped']}")
        if s.get("beyond_max_pairs"):
            parts.append(f"{s['beyond_max_pairs']} pairs beyond data.max_pairs unused")
        if s.get("missing_files"):
            parts.append(f"{s['missing_files']} referenced image files missing (handled per data.on_corrupt)")
        return f"{self.kind} {self.location}: {s['pairs']} pairs ({', '.join(parts)}) [fingerprint {self.fingerprint}]"


def cap_pairs(num_available: int, max_pairs: int | None, stats: dict[str, int]) -> int:
    """Apply data.max_pairs (after tie dropping); count and log what it leaves out."""
    if max_pairs is not None and max_pairs < 1:  # a negative value would slice pairs off the end
        raise DataError(f"max_pairs={max_pairs} (data.max_pairs / --max-pairs) leaves no pairs to use: set it to at least "
                        "train.batch_size x processes, or null to use every pair")
    kept = num_available if max_pairs is None else min(num_available, max_pairs)
    stats["beyond_max_pairs"] = num_available - kept
    stats["pairs"] = kept
    if kept < num_available:
        log.info("data.max_pairs=%d: using the first %d of %d pairs", max_pairs, kept, num_available)
    return kept


def file_stat(path: Path) -> list:
    return stat_entry(path, path.stat())


def stat_entry(path: Path, st: os.stat_result) -> list:
    """A file's fingerprint entry: what tells a changed file from the one cached."""
    return [str(path), st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------------------------
# Path-based sources (manifest, folders): prompts and image paths, no image bytes held. Only regular files
# are accepted as images (a FIFO or device would block the reader forever); text files must be UTF-8.


class PathPairSource(PairSource):
    """Pairs whose images are files; holds only prompts, paths and meta."""

    def __init__(self, kind: str, location: str, records: list[PairRecord], fingerprint_parts: dict, stats: dict[str, int]):
        super().__init__(kind, location, fingerprint_parts, stats)
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> PairRecord:
        return self._records[i]


def stat_images(records: list, where: str) -> tuple[list, int]:
    """Fingerprint entries (path, size, mtime) for every image, and how many are missing. A path that exists
    but is not a regular file (a FIFO, device or folder) is an error naming the pair: reading a FIFO blocks
    forever, so it must be caught here, before any worker opens it."""
    entries, missing = [], 0
    for record in records:
        # a PairRecord's two images, or a labelled ImageRecord's one (data.records)
        paths = (record.image,) if hasattr(record, "image") else (record.chosen, record.rejected)
        for p in paths:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                entries.append([p, None, None])
                missing += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{where}, {'image' if len(paths) == 1 else 'pair'} {record.key}: {p} is not a regular file (a FIFO, device or folder); "
                                "point it to an image file")
            entries.append(stat_entry(Path(p), st))
    return entries, missing


def read_text(path: Path) -> str:
    """A text file as str; bytes that are not UTF-8 are an error naming the line (a leading BOM is dropped)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8 "
                        "(e.g. `iconv -f latin1 -t utf-8`)") from err


def parse_json(text: str, where: str):
    """json.loads, with a DataError naming `where` (file, or file and line) on bad JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err})") from err
