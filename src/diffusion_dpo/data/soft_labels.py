"""Per-pair preference probabilities for soft labels (loss.soft_labels): read from the data, once, at setup.

    probs = preference_probabilities(source, temperature=1.0)   # float32 (N,), probs[i] for source[i]

A pair's probability that `chosen` is preferred: its `pref_prob` column (in [0, 1]) where the data has one,
else sigmoid(margin / T) of the reward-score gap `margin` that `diffusion-dpo label` and `generate-pairs` write.
"""

from __future__ import annotations

import math

import torch

from diffusion_dpo.errors import DataError


def _number(value, where: str, column: str) -> float:
    """A finite float from a JSON number or a CSV string."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{where}: column {column} must be a finite number, got {value!r}")
    return number


def preference_probabilities(source, temperature: float = 1.0) -> torch.Tensor:
    """float32 (len(source),): each pair's preference probability, from the column its row has (pref_prob first).
    Raises DataError in one line for data with neither column, a row without a value or a value out of range."""
    records = [source[i] for i in range(len(source))]
    column = next((c for c in ("pref_prob", "margin") if any(r.meta.get(c) not in (None, "") for r in records)), None)
    if column is None:
        raise DataError(f"loss.soft_labels=true needs a per-pair preference probability, but {source.location} has "
                        "neither a pref_prob column (in [0, 1]) nor a margin column (reward-score gap): add one, or "
                        "set loss.soft_labels=false")
    values = []
    for record in records:
        where = f"{source.location} pair {record.key}"
        value = _number(record.meta.get(column), where, column)
        if column == "pref_prob" and not 0.0 <= value <= 1.0:
            raise DataError(f"{where}: pref_prob must be in [0, 1] (probability that chosen is preferred), got {value}")
        values.append(value)
    values = torch.tensor(values, dtype=torch.float64)
    return (values if column == "pref_prob" else torch.sigmoid(values / temperature)).float()
