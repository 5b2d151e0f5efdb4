"""`diffusion-dpo demo --compare-losses --quick`: two losses on the reduced demo world, a few steps, one seed.
The table (markdown + JSON) and the grid are written, the numbers are in range, and a rerun retrains nothing.
The full comparison (every loss, 3 seeds) is in docs/losses.md; its choice rule and table are checked here on
hand-made rows."""

from __future__ import annotations

import json

import pytest

from diffusion_dpo.cli import main

ARGS = ["demo", "--compare-losses", "--quick", "--steps", "3", "--seeds", "0", "--losses", "sft", "--threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def quick_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(ARGS + ["--output-dir", str(out)]) == 0
    return out


def test_quick_compare_writes_table_and_grid(quick_compare):
    result = json.loads((quick_compare / "comparison.json").read_text())
    rows = {r["loss"]: r for r in result["rows"]}
    assert set(rows) == {"dpo", "sft"}  # dpo runs even when --losses omits it: it is the table's reference
    for r in rows.values():
        assert r["seed"] == 0 and r["setting"] is None and r["steps_timed"] == 3
        for key in ("win_vs_base",) + (("win_vs_dpo",) if r["loss"] != "dpo" else ()):
            w = r[key]
            assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
            assert w["wins"] + w["ties"] + w["losses"] == w["prompts"] == 9  # the quick demo's held-out prompts
        assert 0 <= r["fidelity_percent"] <= 100
        assert r["fidelity_change"] == pytest.approx(r["fidelity_percent"] - r["fidelity_base_percent"])
        assert 0 < r["seconds_per_step"] < 60
        assert 0 < r["cpu_seconds_per_step"] < 60
        assert 100 < r["peak_rss_mb"] < 64_000  # a whole training process (torch + the miniature model), in MiB
    md = (quick_compare / "comparison.md").read_text()
    for r in rows.values():
        assert f"| {r['loss']} | - | 0 | {r['judge_mean']:.3f} ({r['judge_base_mean']:.3f}) |" in md
    from PIL import Image

    with Image.open(quick_compare / "grid_seed0.png") as grid:
        assert grid.size[1] == 26 + 3 * (32 * 3 + 2)  # rows base / DPO / SFT, images upscaled x3


def test_quick_compare_rerun_retrains_nothing(quick_compare, capsys):
    stamps = {n: (quick_compare / "seed0" / n / "measure.json").stat().st_mtime_ns for n in ("dpo", "sft")}
    assert main(ARGS + ["--output-dir", str(quick_compare)]) == 0
    assert "0 images sampled" in capsys.readouterr().out
    assert {n: (quick_compare / "seed0" / n / "measure.json").stat().st_mtime_ns for n in stamps} == stamps


def test_report_only_tables_what_is_finished_and_lists_the_rest(quick_compare):
    stamp = (quick_compare / "seed0" / "dpo" / "measure.json").stat().st_mtime_ns
    args = [a if a != "sft" else "mapo" for a in ARGS]  # mapo was never trained here
    assert main(args + ["--report-only", "--output-dir", str(quick_compare)]) == 0
    result = json.loads((quick_compare / "comparison.json").read_text())
    assert [r["run"] for r in result["rows"]] == ["dpo"]
    assert result["sweep"]["mapo"] == {"key": "loss.mapo_weight", "rows": [], "complete": False, "chosen": None}
    assert result["missing"] == ["seed0/mapo-lambda1", "seed0/mapo-lambda0.1"]  # the default first
    assert "Not finished yet (2 runs" in (quick_compare / "comparison.md").read_text()
    assert not (quick_compare / "seed0" / "mapo-lambda0.1").exists()  # nothing trained
    assert (quick_compare / "seed0" / "dpo" / "measure.json").stat().st_mtime_ns == stamp


def test_sweep_runs_every_loss_default_first(tmp_path):
    from diffusion_dpo.demo.compare import CompareSettings, Comparison

    tasks = Comparison(CompareSettings(output_dir=str(tmp_path), losses=["ipo", "cdpo"])).sweep_tasks()
    assert tasks == [(0, "ipo", 2000.0), (0, "cdpo", 0.1), (0, "ipo", 500.0), (0, "cdpo", 0.05),
                     (0, "ipo", 8000.0), (0, "cdpo", 0.25)]


@pytest.mark.fault(input="`demo --compare-losses --losses` with an unknown loss", behaviour="exit 2: names it and the valid losses")
def test_unknown_loss_is_refused(tmp_path, capsys):
    assert main(["demo", "--compare-losses", "--losses", "dpo", "orpo", "--output-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "orpo" in err and "simpo" in err
    assert not (tmp_path / "c").exists()  # refused before any work


@pytest.mark.fault(input="`demo --seeds`/`--losses` without `--compare-losses`", behaviour="exit 2: says they belong to --compare-losses")
def test_compare_flags_without_compare_losses_are_refused(tmp_path, capsys):
    assert main(["demo", "--seeds", "0", "1", "--output-dir", str(tmp_path / "d")]) == 2
    assert "--compare-losses" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def _row(setting: str, win: float, fidelity_change: float, judge: float = 0.5) -> dict:
    return {"setting": setting, "win_vs_base": {"win_rate": win}, "fidelity_change": fidelity_change,
            "judge_mean": judge}


def test_sweep_choice_prefers_win_rate_within_the_fidelity_guard():
    from diffusion_dpo.demo.compare import choose

    rows = [_row("train.beta=500", 0.9, -2.5), _row("train.beta=2000", 0.7, -2.0), _row("train.beta=8000", 0.6, 1.0)]
    assert choose(rows) == 2000.0  # 500 wins more but loses 2.5 points of fidelity (> 2: reward hacking)
    rows = [_row("loss.simpo_gamma=0", 0.7, 0.0, judge=0.4), _row("loss.simpo_gamma=0.5", 0.7, 0.0, judge=0.6)]
    assert choose(rows) == 0.5  # equal win rates: the higher judge mean
    rows = [_row("loss.mapo_weight=0.1", 0.8, -5.0), _row("loss.mapo_weight=1", 0.6, -3.0)]
    assert choose(rows) == 0.1  # none within the guard: the best of all, not an error


def test_run_names_and_overrides_name_the_swept_key():
    from diffusion_dpo.config import load_config
    from diffusion_dpo.demo.compare import SWEEPS, run_name, setting_override

    assert run_name("cdpo", 0.05) == "cdpo-eps0.05" and run_name("sft", None) == "sft"
    for loss, (key, _, values) in SWEEPS.items():
        cfg = load_config(None, [f"train.method={loss}", *setting_override(loss, values[0])])
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == values[0]
