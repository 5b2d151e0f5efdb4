"""Win rates and intervals with hand-derived values."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_dpo.evaluate import stats


def test_outcomes_use_the_per_prompt_mean_over_images():
    # prompt 0: model mean 2.0 vs base 1.5 -> win; prompt 1: 1.0 vs 1.0 -> tie; prompt 2: 0 vs 3 -> loss
    model = np.array([[1.0, 3.0], [0.0, 2.0], [0.0, 0.0]])
    base = np.array([[1.0, 2.0], [1.0, 1.0], [3.0, 3.0]])
    assert stats.prompt_outcomes(model, base).tolist() == [1.0, 0.5, 0.0]
    w = stats.win_rate(model, base, resamples=200)
    assert w["win_rate"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert (w["wins"], w["ties"], w["losses"], w["prompts"]) == (1, 1, 1, 3)


def test_identical_models_win_half_with_an_interval_containing_half():
    x = np.random.default_rng(0).normal(size=(50, 4))
    w = stats.win_rate(x, x.copy())
    assert w["win_rate"] == 0.5 and w["ci_low"] <= 0.5 <= w["ci_high"]


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    outcomes = np.array([1.0] * 30 + [0.0] * 10)  # mean 0.75
    a = stats.bootstrap_interval(outcomes, resamples=2000, seed=0)
    assert a == stats.bootstrap_interval(outcomes, resamples=2000, seed=0)
    assert a[0] < 0.75 < a[1]
    # binomial sd = sqrt(.75 * .25 / 40) = 0.0685 -> a 95% interval about +-0.13
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * 0.0685, abs=0.04)
    assert stats.bootstrap_interval(np.ones(10)) == (1.0, 1.0)


def test_summary_and_categories():
    s = stats.summarize(np.array([[1.0, 2.0], [3.0, 10.0]]))
    assert s == {"mean": 4.0, "median": 2.5, "std": pytest.approx(np.std([1, 2, 3, 10])), "n": 4}
    model = np.array([[2.0], [0.0], [5.0]])
    base = np.array([[1.0], [1.0], [1.0]])
    cats = stats.by_category(["a", "a", "b"], model, base, resamples=100)
    assert cats["a"]["mean"] == 1.0 and cats["a"]["prompts"] == 2
    assert cats["a"]["vs_baseline_win_rate"] == 0.5 and cats["b"]["vs_baseline_win_rate"] == 1.0
    assert stats.by_category(["", "", ""], model) == {}
