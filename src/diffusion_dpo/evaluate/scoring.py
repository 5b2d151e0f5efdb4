"""Scoring sampled folders with reward models and comparing models against a baseline.

Input: folders written by `sampling.sample_model` (images + samples.jsonl + sampling.json), one per model,
all from the same prompts and seeds. Output: per-image scores (P, N) per model and metric, and result
entries that each carry their full provenance (docs/evaluation.md, "results.json").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_dpo.errors import CorruptImageError, DataError
from diffusion_dpo.evaluate import stats


@dataclass
class SampleSet:
    """One model's sampled images, read back from its folder."""

    name: str
    folder: Path
    records: list[dict]  # samples.jsonl rows, in (prompt_index, image_index) order
    sampling: dict  # sampling.json

    @property
    def num_prompts(self) -> int:
        return 1 + max(r["prompt_index"] for r in self.records)

    @property
    def images_per_prompt(self) -> int:
        return 1 + max(r["image_index"] for r in self.records)

    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records if r["image_index"] == 0]

    def categories(self) -> list[str]:
        return [r["category"] for r in self.records if r["image_index"] == 0]


def read_samples(folder: str | Path) -> SampleSet:
    """Read a model's sample folder; every planned image must exist (else: DataError naming what is missing)."""
    folder = Path(folder)
    manifest = folder / "samples.jsonl"
    if not manifest.exists():
        raise DataError(f"{folder}: no samples.jsonl; sample the model first with `diffusion-dpo sample ... "
                        f"--out {folder.parent} --name {folder.name}`")
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise DataError(f"{manifest}: empty")
    records.sort(key=lambda r: (r["prompt_index"], r["image_index"]))
    missing = [r["file"] for r in records if not (folder / r["file"]).exists()]
    if missing:
        raise DataError(f"{folder}: {len(missing)} of {len(records)} images are missing (first: {missing[0]}); "
                        f"rerun the same `diffusion-dpo sample` command to finish them")
    sampling_path = folder / "sampling.json"
    sampling = json.loads(sampling_path.read_text()) if sampling_path.exists() else {}
    return SampleSet(folder.name, folder, records, sampling)


def read_sample_sets(samples_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, SampleSet]:
    """The sample folders `names` under `samples_dir` (default: every subfolder holding a samples.jsonl, sorted),
    read with read_samples; DataError when there is none."""
    samples_dir = Path(samples_dir)
    if names is None:
        names = sorted(p.name for p in samples_dir.iterdir() if (p / "samples.jsonl").exists()) \
            if samples_dir.is_dir() else []
    if not names:
        raise DataError(f"no sampled models in {samples_dir}; run `diffusion-dpo sample --out {samples_dir} ...` "
                        f"first, or pass --samples")
    return {n: read_samples(samples_dir / n) for n in names}


def load_image(path: str | Path):
    """A PIL RGB image, decoded as training decodes (data.dataset.decode_image), or CorruptImageError naming the file."""
    from diffusion_dpo.data.dataset import decode_image

    path = Path(path)
    if not path.exists():
        raise CorruptImageError(f"image {path} does not exist")
    try:
        return decode_image(path)
    except CorruptImageError as err:
        raise CorruptImageError(f"image {path} cannot be decoded ({err}); delete it and "
                                f"rerun `diffusion-dpo sample` to regenerate it") from err


def check_comparable(sets: Sequence[SampleSet]) -> None:
    """All models must share prompts, images per prompt and seeds (else win rates compare different things)."""
    first = sets[0]
    key = [(r["prompt_index"], r["image_index"], r["prompt"], r["seed"]) for r in first.records]
    for other in sets[1:]:
        if [(r["prompt_index"], r["image_index"], r["prompt"], r["seed"]) for r in other.records] != key:
            raise DataError(f"models {first.name!r} and {other.name!r} were sampled with different prompts, "
                            f"images per prompt or seeds; sample both with the same --prompts, "
                            f"--images-per-prompt and --seed")


def score_set(reward: Any, samples: SampleSet, batch_size: int = 16) -> np.ndarray:
    """Scores of every image, shape (P, N). Images are decoded batch by batch (bounded memory)."""
    scores = np.zeros(len(samples.records), dtype=np.float64)
    for start in range(0, len(samples.records), batch_size):
        rows = samples.records[start:start + batch_size]
        images = [load_image(samples.folder / r["file"]) for r in rows]
        scores[start:start + len(rows)] = reward.score(images, [r["prompt"] for r in rows]).double().numpy()
    return scores.reshape(samples.num_prompts, samples.images_per_prompt)


def score_models(metric_specs: Sequence[str], sets: dict[str, SampleSet], options: dict[str, dict[str, Any]],
                 device: str = "cpu", batch_size: int = 16, verbose: bool = True) -> tuple[dict, dict]:
    """Score every model's images with every metric (evaluate.rewards.load_reward specs), loading one reward
    model at a time (only one is ever in memory). `options`: metric name (lower case) -> scorer options.
    Returns (metric -> model -> (P, N) scores, metric -> reward info)."""
    from diffusion_dpo.evaluate.rewards import load_reward

    scores: dict[str, dict[str, np.ndarray]] = {}
    infos: dict[str, dict] = {}
    for spec in metric_specs:
        name = spec.partition("=")[0].strip()
        reward = load_reward(spec, device=device, batch_size=batch_size, **options.get(name.lower(), {}))
        infos[reward.name] = reward.info
        scores[reward.name] = {}
        for model, s in sets.items():
            if verbose:
                print(f"scoring {model} with {reward.name} ({len(s.records)} images)")
            scores[reward.name][model] = score_set(reward, s, batch_size=batch_size)
        del reward
    return scores, infos


def compare(scores: dict[str, dict[str, np.ndarray]], sets: dict[str, SampleSet], infos: dict[str, dict],
            baseline: str, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Result entries, one per (metric, model): summary, win rate against `baseline` (not for the baseline
    itself) and per-category breakdown; each entry carries metric provenance and sampling provenance.

    scores: metric -> model -> (P, N) array.
    """
    entries: list[dict] = []
    for metric, per_model in scores.items():
        for model, values in per_model.items():
            s = sets[model]
            sampling = s.sampling
            entry: dict[str, Any] = {
                "model": model, "metric": metric,
                "metric_model": infos[metric].get("model"), "metric_version": infos[metric].get("version"),
                "scale": infos[metric].get("scale"), "preprocessing": infos[metric].get("preprocessing"),
                "prompt_set": sampling.get("prompt_set"), "num_prompts": s.num_prompts,
                "images_per_prompt": s.images_per_prompt, "seed": sampling.get("seed"),
                "seed_rule": sampling.get("seed_rule"), "sampler": sampling.get("sampler"),
                "generator": sampling.get("model"),
                **stats.summarize(values),
            }
            base_values = per_model[baseline] if model != baseline else None
            if base_values is not None:
                entry["vs_baseline"] = {"baseline": baseline, **stats.win_rate(values, base_values, resamples, seed=seed)}
            cats = s.categories()
            if any(cats):
                entry["by_category"] = stats.by_category(cats, values, base_values, resamples, seed=seed)
            entries.append(entry)
    return entries
