"""`diffusion-dpo demo --compare-curriculum --quick`: DPO and Curriculum-DPO on the reduced demo world, a few steps,
one seed. Both arms train from the same all-ranked pairs file with the same step budget (read back from their run
folders' config.yaml and train_summary.json), the curriculum's levels follow the paper's formula, the table is
written, and a rerun retrains and resamples nothing. The measured 3-seed comparison is in docs/curriculum.md."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from diffusion_dpo.cli import main

STEPS = 5
ARGS = ["demo", "--compare-curriculum", "--quick", "--steps", str(STEPS), "--seeds", "0", "--threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    assert main(ARGS + ["--output-dir", str(out)]) == 0
    return out


def _config(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_both_arms_train_the_same_pairs_for_the_same_steps(quick):
    seed = quick / "seed0"
    dpo, cur = _config(seed / "dpo"), _config(seed / "curriculum")
    pairs = seed / "pairs" / "pairs.jsonl"
    assert dpo["data"]["source"] == cur["data"]["source"] == str(pairs)
    assert dpo["data"]["cache_dir"] is None and cur["data"]["cache_dir"] is None  # the same on-the-fly data path
    assert dpo["train"]["max_steps"] == cur["train"]["max_steps"] == STEPS
    assert dpo["train"]["curriculum"]["enabled"] is False
    # B = 5 levels, K = steps // B = 1 step per level: the last level trains K steps too
    assert {k: cur["train"]["curriculum"][k] for k in ("enabled", "difficulty", "levels", "steps_per_level")} == {
        "enabled": True, "difficulty": "rank_difference", "levels": 5, "steps_per_level": 1}
    # nothing else differs: the order is the only change
    for section in dpo:
        if section not in ("train", "output"):
            assert dpo[section] == cur[section], section
    rest = lambda c: {k: v for k, v in c["train"].items() if k != "curriculum"}  # noqa: E731
    assert rest(dpo) == rest(cur)
    assert {**dpo["output"], "dir": None} == {**cur["output"], "dir": None}
    for run in ("dpo", "curriculum"):
        summary = json.loads((seed / run / "train_summary.json").read_text())
        assert summary["steps"] == STEPS and summary["trained_pairs"] == STEPS * 8  # the quick demo's batch of 8

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert all(r["margin"] >= 0.1 and r["images_per_prompt"] == 4 for r in rows)  # the quick demo's K = 4 images
    # M = 4, B = 5: level = 6 - ceil(5 d / 3): d = 3 -> 1, d = 2 -> 2, d = 1 -> 4 (levels 3 and 5 empty)
    count = {d: sum(r["rank_difference"] == d for r in rows) for d in (1, 2, 3)}
    result = json.loads((quick / "comparison.json").read_text())
    record = result["pairs"]["0"]
    assert record["pairs"] == len(rows) and record["file"] == str(pairs)
    assert record["per_level"] == [count[3], count[2], 0, count[1], 0]
    # the curriculum's pool per step: levels 1..k with k = step (one step per level), the same pairs file
    metrics = [json.loads(line) for line in (seed / "curriculum" / "metrics.jsonl").read_text().splitlines()]
    pool = [count[3], count[3] + count[2], count[3] + count[2], len(rows), len(rows)]
    assert [(m["curriculum_level"], m["curriculum_pairs"]) for m in metrics] == list(zip(range(1, 6), pool))
    assert all("curriculum_level" not in json.loads(line)
               for line in (seed / "dpo" / "metrics.jsonl").read_text().splitlines())


def test_table_rows_and_head_to_head(quick):
    result = json.loads((quick / "comparison.json").read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert set(rows) == {"dpo", "curriculum"} and result["missing"] == []
    assert rows["dpo"]["loss"] == "dpo" and rows["curriculum"]["loss"] == "curriculum-dpo"
    assert "win_vs_dpo" not in rows["dpo"]
    for r in rows.values():
        for key in ("win_vs_base",) + (("win_vs_dpo",) if r["run"] == "curriculum" else ()):
            w = r[key]
            assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
            assert w["wins"] + w["ties"] + w["losses"] == w["prompts"] == 9  # the quick demo's held-out prompts
        assert r["fidelity_change"] == pytest.approx(r["fidelity_percent"] - r["fidelity_base_percent"])
        assert r["judge_base_mean"] == rows["dpo"]["judge_base_mean"]  # one base sample set per seed
    md = (quick / "comparison.md").read_text()
    assert "| curriculum-dpo | rank_difference, B=5, K=1 | 0 |" in md
    assert f"| 0 | {result['pairs']['0']['pairs']} |" in md
    from PIL import Image

    with Image.open(quick / "grid_seed0.png") as grid:
        assert grid.size[1] == 26 + 3 * (32 * 3 + 2)  # rows base / DPO / Curriculum-DPO


def test_rerun_resumes_and_redoes_nothing(quick, capsys):
    seed = quick / "seed0"
    stamps = {p: p.stat().st_mtime_ns for p in [seed / "pairs" / "pairs.jsonl", seed / "dpo" / "measure.json",
                                                 seed / "curriculum" / "measure.json"]}
    capsys.readouterr()
    assert main(ARGS + ["--output-dir", str(quick)]) == 0
    out = capsys.readouterr().out
    found = re.findall(r"(\w+): (\d+) images sampled", out)
    assert {name for name, _ in found} == {"dpo", "curriculum"} and {n for _, n in found} == {"0"}  # all on disk
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.fault(input="`demo --compare-curriculum` with `--losses`",
                   behaviour="exit 2: says --losses belongs to --compare-losses")
def test_losses_flag_is_refused(tmp_path, capsys):
    assert main(["demo", "--compare-curriculum", "--losses", "ipo", "--output-dir", str(tmp_path / "c")]) == 2
    assert "--losses belongs to --compare-losses" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.fault(input="`demo --compare-curriculum --compare-losses`", behaviour="exit 2: run one of the two")
def test_both_comparisons_at_once_are_refused(tmp_path, capsys):
    assert main(["demo", "--compare-curriculum", "--compare-losses", "--output-dir", str(tmp_path / "c")]) == 2
    assert "run one" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_full_size_settings_and_their_levels(tmp_path):
    """The comparison's own defaults (a reduced demo, both arms alike) and the flags that change them."""
    from types import SimpleNamespace

    from diffusion_dpo.cli import build_parser
    from diffusion_dpo.commands.demo import curriculum_settings_from_args
    from diffusion_dpo.config import load_config
    from diffusion_dpo.demo.curriculum_compare import CurriculumComparison, curriculum_overrides
    from diffusion_dpo.train.curriculum import difficulty_levels

    args = build_parser("demo").parse_args(["demo", "--compare-curriculum", "--output-dir", str(tmp_path)])
    c = curriculum_settings_from_args(args)
    s = CurriculumComparison(c).settings(1)
    assert (s.train_prompts, s.images_per_prompt, s.train_steps, s.eval_images) == (54, 6, 150, 4)
    assert (s.pair_strategy, s.pair_margin, s.seed, s.output_dir) == ("all-ranked", 0.1, 1, str(tmp_path / "seed1"))
    cfg = load_config(None, ["data.source=x.jsonl", *curriculum_overrides(c, s)]).train.curriculum
    assert (cfg.enabled, cfg.levels, cfg.steps_per_level) == (True, 5, 30)  # 150 steps = 5 levels x 30
    # K = 6 images, B = 5: level k holds exactly rank difference 6 - k (k = 6 - ceil(5 d / 5))
    pairs = [SimpleNamespace(meta={"rank_difference": d, "images_per_prompt": 6}, key=str(d)) for d in range(1, 6)]
    assert difficulty_levels(pairs, "rank_difference", 5, "x") == [5, 4, 3, 2, 1]

    args = build_parser("demo").parse_args(["demo", "--compare-curriculum", "--steps", "40", "--train-prompts", "10",
                                      "--pair-images", "3", "--eval-images", "2", "--output-dir", str(tmp_path)])
    s = CurriculumComparison(curriculum_settings_from_args(args)).settings(0)
    assert (s.train_prompts, s.images_per_prompt, s.train_steps, s.eval_images) == (10, 3, 40, 2)


@pytest.mark.fault(input="`demo --train-prompts`/`--pair-images`/`--eval-images` without `--compare-curriculum`",
                   behaviour="exit 2: says they belong to --compare-curriculum")
def test_curriculum_flags_without_the_comparison_are_refused(tmp_path, capsys):
    assert main(["demo", "--pair-images", "4", "--output-dir", str(tmp_path / "d")]) == 2
    assert "belong to --compare-curriculum" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.fault(input="`demo --compare-curriculum --pair-images 1`", behaviour="exit 2: names --pair-images")
def test_too_few_pair_images_are_refused(tmp_path, capsys):
    assert main(["demo", "--compare-curriculum", "--pair-images", "1", "--output-dir", str(tmp_path / "c")]) == 2
    assert "--pair-images must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
