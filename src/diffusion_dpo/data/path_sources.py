"""Path-based preference-pair sources (manifest, folders): prompts and image paths, no image bytes held.

    source = open_manifest(cfg)   # JSONL / JSON / CSV rows {prompt, chosen, rejected, ...}
    source = open_folders(cfg)    # chosen/ and rejected/ with matching names + a prompts file

Opened through `data.sources.open_source`, which picks the format. Only regular files are accepted as images
(a FIFO or device would block the reader forever); text files must be UTF-8.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
from pathlib import Path

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.records import PairRecord
from diffusion_dpo.data.sources import MANIFEST_SUFFIXES, PAIR_COLUMNS, PairSource, cap_pairs, file_stat, stat_entry
from diffusion_dpo.errors import DataError

log = logging.getLogger("diffusion_dpo")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PROMPT_FILES = ("prompts.jsonl", "prompts.json", "prompts.txt", "prompts.tsv")



class PathPairSource(PairSource):
    """Pairs whose images are files; holds only prompts, paths and meta."""

    def __init__(self, kind: str, location: str, records: list[PairRecord], fingerprint_parts: dict, stats: dict[str, int]):
        super().__init__(kind, location, fingerprint_parts, stats)
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> PairRecord:
        return self._records[i]


def _stat_images(records: list[PairRecord], where: str) -> tuple[list, int]:
    """Fingerprint entries (path, size, mtime) for every image, and how many are missing. A path that exists
    but is not a regular file (a FIFO, device or folder) is an error naming the pair: reading a FIFO blocks
    forever, so it must be caught here, before any worker opens it."""
    entries, missing = [], 0
    for record in records:
        for p in (record.chosen, record.rejected):
            try:
                st = os.stat(p)
            except FileNotFoundError:
                entries.append([p, None, None])
                missing += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{where}, pair {record.key}: {p} is not a regular file (a FIFO, device or folder); "
                                "point it to an image file")
            entries.append(stat_entry(Path(p), st))
    return entries, missing


def _read_text(path: Path) -> str:
    """A text file as str; bytes that are not UTF-8 are an error naming the line (a leading BOM is dropped)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8 "
                        "(e.g. `iconv -f latin1 -t utf-8`)") from err


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err})") from err


def _read_manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a JSONL, JSON (list of objects) or CSV manifest."""
    text = _read_text(path)
    if path.suffix == ".csv":
        # newline="": quoted fields may hold line breaks; reader.line_num is the line a row ends on
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return [(reader.line_num, dict(row)) for row in reader]
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from err
    if path.suffix == ".json":
        rows = _json(text, str(path))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a .json manifest must be a list of objects with keys prompt, chosen, rejected")
        return list(enumerate(rows, start=1))
    out = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): a prompt may hold U+2028 etc.
        if not line.strip():
            continue
        row = _json(line, f"{path} line {n}")
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object with keys prompt, chosen, rejected")
        out.append((n, row))
    return out


def open_manifest(cfg: DataConfig) -> PathPairSource:
    path = Path(cfg.source)
    if path.suffix not in MANIFEST_SUFFIXES:
        raise DataError(f"{path}: a manifest must be a .jsonl, .json or .csv file")
    rows = _read_manifest_rows(path)
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
    images, stats["missing_files"] = _stat_images(records, str(path))
    if stats["missing_files"]:
        log.warning("%s: %d referenced image files do not exist; their pairs will be %s at decode time (data.on_corrupt=%s)",
                    path, stats["missing_files"], "skipped and counted" if cfg.on_corrupt == "skip" else "an error", cfg.on_corrupt)
    parts = {"format": "manifest", "files": [file_stat(path)] + images, "pairs": len(records)}
    return PathPairSource("manifest", str(path), records, parts, stats)


def _find_prompts_file(folder: Path, prompts_file: str | None) -> Path:
    if prompts_file is not None:
        candidates = [Path(prompts_file)] if Path(prompts_file).is_absolute() else [folder / prompts_file, Path(prompts_file)]
        for c in candidates:
            if c.is_file():
                return c
        raise DataError(f"data.prompts_file {prompts_file!r} not found (looked at {', '.join(str(c) for c in candidates)})")
    for name in PROMPT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no prompts file; add one of {', '.join(PROMPT_FILES)} (JSON {{name: prompt}}, JSONL lines "
                    '{"name": ..., "prompt": ...} or "name<TAB>prompt" lines), or set data.prompts_file')


def _read_prompts(path: Path) -> dict[str, str]:
    text = _read_text(path)
    if path.suffix == ".json":
        prompts = _json(text, str(path))
        if not isinstance(prompts, dict):
            raise DataError(f"{path}: expected a JSON object {{image name: prompt}}")
        return {str(k): str(v) for k, v in prompts.items()}
    prompts = {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = _json(line, f"{path} line {n}")
            if not isinstance(row, dict) or "name" not in row or "prompt" not in row:
                raise DataError(f"{path} line {n}: expected {{\"name\": ..., \"prompt\": ...}}")
            prompts[str(row["name"])] = str(row["prompt"])
        else:
            name, tab, prompt = line.partition("\t")
            if not tab:
                raise DataError(f"{path} line {n}: expected 'name<TAB>prompt'")
            prompts[name] = prompt
    return prompts


def _list_images(folder: Path) -> dict[str, Path]:
    """{stem: path} of the image files in `folder`; file names are matched across sides by stem."""
    images: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in images:
                raise DataError(f"{folder}: two images share the name {p.stem!r} ({images[p.stem].name}, {p.name}); names must be unique")
            images[p.stem] = p
    return images


def open_folders(cfg: DataConfig) -> PathPairSource:
    folder = Path(cfg.source)
    sides = {side: folder / side for side in ("chosen", "rejected")}
    for side, sub in sides.items():
        if not sub.is_dir():
            raise DataError(f"{folder}: no {side}/ subfolder; the folders format needs chosen/ and rejected/ with matching file names")
    chosen, rejected = _list_images(sides["chosen"]), _list_images(sides["rejected"])
    only_chosen, only_rejected = sorted(set(chosen) - set(rejected)), sorted(set(rejected) - set(chosen))
    if only_chosen or only_rejected:
        raise DataError(f"{folder}: {len(only_chosen)} image(s) only in chosen/ (e.g. {only_chosen[:3]}) and {len(only_rejected)} only "
                        f"in rejected/ (e.g. {only_rejected[:3]}); every image needs a partner with the same name on the other side")
    prompts_path = _find_prompts_file(folder, cfg.prompts_file)
    prompts = _read_prompts(prompts_path)

    def prompt_for(name: str) -> str | None:  # prompts may be keyed by file name or by stem
        for key in (chosen[name].name, rejected[name].name, name):
            if key in prompts:
                return prompts[key]
        return None

    no_prompt = [name for name in chosen if prompt_for(name) is None]
    if no_prompt:
        raise DataError(f"{prompts_path}: no prompt for {len(no_prompt)} image name(s), e.g. {no_prompt[:3]}")
    records = [PairRecord(prompt_for(name), str(chosen[name]), str(rejected[name]), name) for name in sorted(chosen)]
    stats = {"rows_read": len(records), "ties_dropped": 0}
    records = records[: cap_pairs(len(records), cfg.max_pairs, stats)]
    images, _ = _stat_images(records, f"{folder}")
    parts = {"format": "folders", "files": [file_stat(prompts_path)] + images, "pairs": len(records)}
    return PathPairSource("folders", str(folder), records, parts, stats)
