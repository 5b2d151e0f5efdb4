"""Benchmark prompt sets: built-in names downloaded once and cached, or a local file.

A prompt set is a list of `Prompt(text, category)`. Categories drive the per-category breakdown
of the report: DrawBench's 11 categories, PartiPrompts' 12 categories, HPSv2's 4 styles; Pick-a-Pic
and plain text files have none ("" for every prompt).

Built-in sets (public sources; the first download is cached as normalised JSONL under the cache dir):
| name | prompts | source |
| --- | --- | --- |
| drawbench | 200, 11 categories | Imagen's DrawBench Google sheet (CSV export) |
| partiprompts | 1632, 12 categories | github.com/google-research/parti PartiPrompts.tsv |
| hpsv2 | 4 styles x 800 | hub dataset zhwang/HPDv2, benchmark/{anime,concept-art,paintings,photo}.json |
| pickapic_validation_unique | 500 | hub dataset yuvalkirstain/pickapic_v2_no_images, split validation_unique |
| pickapic_test_unique | 500 | hub dataset yuvalkirstain/pickapic_v2_no_images, split test_unique |
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffusion_dpo.errors import DataError

DRAWBENCH_URL = ("https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY/"
                 "gviz/tq?tqx=out:csv&sheet=Sheet1")
PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
HPS_REPO = "zhwang/HPDv2"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
PICKAPIC_REPO = "yuvalkirstain/pickapic_v2_no_images"

# name -> human-readable source (used in errors and recorded in results.json)
BUILTIN_SETS: dict[str, str] = {
    "drawbench": DRAWBENCH_URL,
    "partiprompts": PARTI_URL,
    "hpsv2": f"hf://datasets/{HPS_REPO}/benchmark/{{{','.join(HPS_STYLES)}}}.json",
    "pickapic_validation_unique": f"hf://datasets/{PICKAPIC_REPO} (split validation_unique)",
    "pickapic_test_unique": f"hf://datasets/{PICKAPIC_REPO} (split test_unique)",
}

_TEXT_COLUMNS = ("prompt", "prompts", "caption", "text")
_CATEGORY_COLUMNS = ("category", "style")
LOCAL_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl")


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str  # built-in name or the local file path
    source: str  # where the prompts came from (URL, hub id or file)
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def limit(self, n: int | None) -> "PromptSet":
        """The first n prompts (all when n is None)."""
        return self if n is None else PromptSet(self.name, self.source, self.prompts[:n])


def default_cache_dir() -> Path:
    root = os.environ.get("DIFFUSION_DPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_dpo"))
    return Path(root) / "prompts"


def load_prompts(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 offline: bool | None = None) -> PromptSet:
    """A built-in prompt set by name (downloaded once, then read from the cache) or a local file
    (.txt one prompt a line; .csv/.tsv with a prompt/caption/text column and optional category/style;
    .json a list of strings or objects, or {category: [prompts]}; .jsonl one object a line)."""
    key = str(name_or_path)
    if key.lower() in BUILTIN_SETS:
        return _load_builtin(key.lower(), Path(cache_dir) if cache_dir else default_cache_dir(), offline)
    path = Path(key)
    if not path.exists():
        raise DataError(f"prompt set {key!r} is neither a built-in name ({', '.join(BUILTIN_SETS)}) nor an "
                        f"existing file; pass --prompts path/to/prompts.txt (or .csv/.tsv/.json/.jsonl)")
    prompts = read_prompt_file(path)
    return PromptSet(name=str(path), source=str(path.resolve()), prompts=prompts)


def read_prompt_file(path: str | os.PathLike) -> tuple[Prompt, ...]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported prompt file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    if not path.is_file():  # a folder, or a FIFO that would block the read forever
        raise DataError(f"{path}: not a regular file; pass a prompt file with --prompts")
    data = path.read_bytes()
    body = data.removeprefix(codecs.BOM_UTF8)  # Excel's "CSV UTF-8" starts with one: not part of the first prompt
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        at = err.start + len(data) - len(body)
        line = data.count(b"\n", 0, at) + 1
        raise DataError(f"{path}: not UTF-8 text (line {line}, byte {at}: {data[at:at + 1]!r}); "
                        f"save the prompt file as UTF-8") from err
    try:
        prompts = _parse(text, suffix, str(path))
    except (json.JSONDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot parse as {suffix[1:]}: {err}") from err
    if not prompts:
        raise DataError(f"{path}: no prompts found")
    return prompts


def _parse(text: str, suffix: str, where: str) -> tuple[Prompt, ...]:
    if suffix == ".txt":
        return tuple(Prompt(line.strip()) for line in text.splitlines() if line.strip())
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
        return tuple(_from_row(row, where, i) for i, row in enumerate(rows))
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return tuple(_from_row(row, where, i) for i, row in enumerate(rows))
    data = json.loads(text)
    if isinstance(data, dict):  # {category: [prompts]}, e.g. HPSv2 styles
        return tuple(Prompt(str(p), str(cat)) for cat, items in data.items() for p in items)
    if isinstance(data, list):
        return tuple(Prompt(item) if isinstance(item, str) else _from_row(item, where, i) for i, item in enumerate(data))
    raise DataError(f"{where}: expected a JSON list of prompts or an object {{category: [prompts]}}")


def _from_row(row: object, where: str, index: int) -> Prompt:
    if not isinstance(row, dict):
        raise DataError(f"{where}: entry {index} is not an object with a prompt field")
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    text_key = next((k for k in _TEXT_COLUMNS if k in lower), None)
    if text_key is None:
        raise DataError(f"{where}: entry {index} has no prompt column; expected one of {', '.join(_TEXT_COLUMNS)} "
                        f"(found {', '.join(map(str, row))})")
    category_key = next((k for k in _CATEGORY_COLUMNS if k in lower), None)
    return Prompt(str(lower[text_key]).strip(), str(lower[category_key]).strip() if category_key else "")


# --- built-in sets ---------------------------------------------------------------------------------

def _load_builtin(name: str, cache_dir: Path, offline: bool | None) -> PromptSet:
    cached = cache_dir / f"{name}.jsonl"
    source = BUILTIN_SETS[name]
    if cached.exists():
        return PromptSet(name, source, read_prompt_file(cached))
    from diffusion_dpo.runtime import datasets_offline, write_text_atomic  # here: runtime imports torch

    if offline is None:
        offline = datasets_offline()
    hint = (f"download it on a machine with network access (it is cached at {cached}), or pass a local "
            f"file with --prompts path/to/prompts.txt (.txt/.csv/.tsv/.json/.jsonl)")
    if offline:
        raise DataError(f"prompt set {name!r} is not cached and we are offline; its source is {source}; {hint}")
    try:
        prompts = _FETCHERS[name]()
    except DataError:
        raise
    except Exception as err:  # network errors come in many types (urllib, requests, hub)
        raise DataError(f"cannot download prompt set {name!r} from {source}: {type(err).__name__}: {err}; {hint}") from err
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, "".join(json.dumps({"prompt": p.text, "category": p.category}) + "\n" for p in prompts))
    return PromptSet(name, source, prompts)


def _fetch_url(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed public URLs)
        return resp.read().decode("utf-8")


def _fetch_drawbench() -> tuple[Prompt, ...]:
    rows = csv.reader(io.StringIO(_fetch_url(DRAWBENCH_URL)))
    next(rows)  # header: Prompts, Category
    return tuple(Prompt(r[0].strip(), r[1].strip()) for r in rows if r and r[0].strip())


def _fetch_parti() -> tuple[Prompt, ...]:
    return _parse(_fetch_url(PARTI_URL), ".tsv", PARTI_URL)


def _fetch_hps() -> tuple[Prompt, ...]:
    from huggingface_hub import hf_hub_download

    out: list[Prompt] = []
    for style in HPS_STYLES:
        path = hf_hub_download(HPS_REPO, f"benchmark/{style}.json", repo_type="dataset")
        out.extend(Prompt(str(p), style) for p in json.loads(Path(path).read_text(encoding="utf-8")))
    return tuple(out)


def _fetch_pickapic(split: str):
    def fetch() -> tuple[Prompt, ...]:
        from datasets import load_dataset

        ds = load_dataset(PICKAPIC_REPO, split=split)
        seen: dict[str, None] = {}
        for caption in ds["caption"]:
            seen.setdefault(str(caption).strip(), None)
        return tuple(Prompt(c) for c in seen)
    return fetch


_FETCHERS = {
    "drawbench": _fetch_drawbench,
    "partiprompts": _fetch_parti,
    "hpsv2": _fetch_hps,
    "pickapic_validation_unique": _fetch_pickapic("validation_unique"),
    "pickapic_test_unique": _fetch_pickapic("test_unique"),
}
