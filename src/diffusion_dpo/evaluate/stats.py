"""Pure statistics for comparing models: summaries, per-prompt win rates, bootstrap intervals.

Conventions (docs/metrics.md):
- Scores arrive as a (P, N) array: P prompts x N images per prompt, the same seeds for every model.
- Per prompt, a model's score is the mean over its N images. It wins the prompt against the
  baseline if that mean is higher (1), ties if equal (0.5), loses otherwise (0).
- Win rate = mean of the per-prompt outcomes. Its 95% interval is a percentile bootstrap over
  prompts (resampling prompts with replacement, fixed seed), so it reflects prompt-to-prompt variance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def summarize(scores: np.ndarray) -> dict[str, float]:
    """Mean, median, standard deviation and count over every image."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    return {"mean": float(flat.mean()), "median": float(np.median(flat)), "std": float(flat.std(ddof=0)),
            "n": int(flat.size)}


def prompt_outcomes(model: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per-prompt outcome of `model` against `baseline`: 1 win, 0.5 tie, 0 loss. Inputs (P, N) or (P,)."""
    model = np.asarray(model, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if model.shape[0] != baseline.shape[0]:
        raise ValueError(f"model has {model.shape[0]} prompts, baseline {baseline.shape[0]}")
    m = model.reshape(model.shape[0], -1).mean(axis=1)  # (P,)
    b = baseline.reshape(baseline.shape[0], -1).mean(axis=1)
    return np.where(m > b, 1.0, np.where(m == b, 0.5, 0.0))


def bootstrap_interval(outcomes: np.ndarray, resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `outcomes` (resampled with replacement)."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, outcomes.size, size=(resamples, outcomes.size))
    means = outcomes[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def win_rate(model: np.ndarray, baseline: np.ndarray, resamples: int = 2000, level: float = 0.95,
             seed: int = 0) -> dict[str, float]:
    """Win rate of `model` against `baseline` with its bootstrap interval and win/tie/loss counts."""
    out = prompt_outcomes(model, baseline)
    lo, hi = bootstrap_interval(out, resamples, level, seed)
    return {"win_rate": float(out.mean()), "ci_low": lo, "ci_high": hi, "wins": int((out == 1).sum()),
            "ties": int((out == 0.5).sum()), "losses": int((out == 0).sum()), "prompts": int(out.size),
            "bootstrap_resamples": resamples, "level": level}


def by_category(categories: Sequence[str], model: np.ndarray, baseline: np.ndarray | None = None,
                resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per category: the model's summary and, with a baseline, its win rate. Empty categories are skipped."""
    cats = np.asarray(list(categories), dtype=object)
    model = np.asarray(model, dtype=np.float64)
    result: dict[str, dict[str, float]] = {}
    for cat in sorted({c for c in cats if c}):
        rows = cats == cat
        entry = summarize(model[rows])
        entry["prompts"] = int(rows.sum())
        if baseline is not None:
            entry.update({f"vs_baseline_{k}": v for k, v in
                          win_rate(model[rows], np.asarray(baseline)[rows], resamples, seed=seed).items()
                          if k in ("win_rate", "ci_low", "ci_high")})
        result[cat] = entry
    return result
