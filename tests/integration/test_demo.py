"""`diffusion-dpo demo --quick` end to end on the shipped miniature base: every stage runs through the
toolkit's own code, the output files exist, DPO samples score higher with the judge than the base's on
the same seeds, and a rerun resumes (skips every finished stage)."""

from __future__ import annotations

import json

import pytest

from diffusion_dpo.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output-dir", str(out), "--threads", "1", "--no-progress"]) == 0
    return out


def test_quick_demo_writes_every_output(quick_demo):
    for name in ("results.json", "report.html", "results.md", "grid.png", "demo.json", "pairs/pairs.jsonl",
                 "dpo/pytorch_lora_weights.safetensors", "sft/pytorch_lora_weights.safetensors"):
        assert (quick_demo / name).is_file(), name
    from PIL import Image

    with Image.open(quick_demo / "grid.png") as grid:
        assert grid.size[1] == 26 + 3 * (32 * 3 + 2)  # rows base / SFT / DPO, images upscaled x3


def test_quick_demo_dpo_beats_base_on_same_seeds(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    models = results["summary"]["demo"]["models"]
    assert models["dpo"]["judge_mean"] > models["base"]["judge_mean"]
    # the comparison is on the same seeds: every model's samples carry the same (prompt, image) seeds
    seeds = {m: [json.loads(line)["seed"] for line in (quick_demo / "samples" / m / "samples.jsonl").open()]
             for m in ("base", "sft", "dpo")}
    assert seeds["base"] == seeds["sft"] == seeds["dpo"]
    entry = next(e for e in results["entries"] if e["model"] == "dpo" and e["metric"] == "judge")
    assert 0.0 <= entry["vs_baseline"]["ci_low"] <= entry["vs_baseline"]["win_rate"] <= entry["vs_baseline"]["ci_high"]


def test_quick_demo_rerun_resumes(quick_demo, capsys):
    before = (quick_demo / "dpo" / "train_summary.json").stat().st_mtime_ns
    assert main(["demo", "--quick", "--output-dir", str(quick_demo), "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dpo: already trained" in out and "0 images sampled" in out
    assert (quick_demo / "dpo" / "train_summary.json").stat().st_mtime_ns == before


def test_rerun_with_other_settings_is_refused(quick_demo):
    assert main(["demo", "--quick", "--output-dir", str(quick_demo), "--seed", "7", "--no-progress"]) == 2
