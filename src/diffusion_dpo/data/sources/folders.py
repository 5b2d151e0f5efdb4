"""Folders sources: chosen/ and rejected/ subfolders whose image files pair up by name, plus a prompts file
(JSON {name: prompt}, JSONL {"name", "prompt"} lines, or "name<TAB>prompt" lines).

    source = open_folders(cfg)

Opened through `data.sources.open_source`, which picks the format.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.records import PairRecord
from diffusion_dpo.data.sources.base import PathPairSource, cap_pairs, file_stat, parse_json, read_text, stat_images
from diffusion_dpo.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PROMPT_FILES = ("prompts.jsonl", "prompts.json", "prompts.txt", "prompts.tsv")


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
    text = read_text(path)
    if path.suffix == ".json":
        prompts = parse_json(text, str(path))
        if not isinstance(prompts, dict):
            raise DataError(f"{path}: expected a JSON object {{image name: prompt}}")
        return {str(k): str(v) for k, v in prompts.items()}
    prompts = {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = parse_json(line, f"{path} line {n}")
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
    images, _ = stat_images(records, f"{folder}")
    parts = {"format": "folders", "files": [file_stat(prompts_path)] + images, "pairs": len(records)}
    return PathPairSource("folders", str(folder), records, parts, stats)
