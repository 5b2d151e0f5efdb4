"""`diffusion-dpo demo --distill-lcm --quick`: distil the shipped demo base into a miniature LCM (a few steps),
sample it against the base, and train Consistency-DPO on it: the plumbing and the files, not the numbers (those are
in docs/demo.md)."""

from __future__ import annotations

import json
import math

import pytest

from diffusion_dpo.cli import main

ARGS = ["demo", "--distill-lcm", "--quick", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def quick_lcm(tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm")
    assert main(ARGS + ["--output-dir", str(out)]) == 0
    return out


def test_quick_run_distils_an_lcm_and_trains_consistency_dpo_on_it(quick_lcm):
    from diffusion_dpo.models.families import detect_spec, family_of

    assert family_of(detect_spec(str(quick_lcm / "lcm"))).name == "lcm"
    assert json.loads((quick_lcm / "lcm" / "model_index.json").read_text())["_class_name"] == \
        "LatentConsistencyModelPipeline"
    quality = json.loads((quick_lcm / "quality.json").read_text())
    assert list(quality) == ["teacher", "teacher-ddim4", "lcm-4step", "lcm-1step"]
    assert quality["lcm-4step"]["sampler"]["scheduler"] == "lcm" and quality["lcm-4step"]["sampler"]["steps"] == 4
    assert 0.0 <= quality["lcm-4step"]["judge_win_vs_teacher"]["win_rate"] <= 1.0
    rows = [json.loads(r) for r in (quick_lcm / "seed0" / "cdpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # student == reference at step 1
    results = json.loads((quick_lcm / "lcm_results.json").read_text())
    assert set(results["seed0"]["models"]) == {"lcm", "cdpo"} and results["seed0"]["train"]["steps"] == 2
    assert "| seed0: cdpo | lcm 4 steps, guidance 3 |" in (quick_lcm / "lcm_results.md").read_text()


def test_rerun_redoes_nothing(quick_lcm):
    lora = quick_lcm / "seed0" / "cdpo" / "pytorch_lora_weights.safetensors"
    stamps = lora.stat().st_mtime_ns, (quick_lcm / "lcm" / "distill.json").stat().st_mtime_ns
    assert main(ARGS + ["--output-dir", str(quick_lcm)]) == 0
    assert (lora.stat().st_mtime_ns, (quick_lcm / "lcm" / "distill.json").stat().st_mtime_ns) == stamps


@pytest.mark.fault(input="`demo --distill-steps` without `--distill-lcm`", behaviour="exit 2: says it belongs to --distill-lcm")
def test_distill_steps_without_distill_lcm_is_refused(tmp_path, capsys):
    assert main(["demo", "--distill-steps", "5", "--output-dir", str(tmp_path / "d")]) == 2
    assert "--distill-lcm" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.fault(input="`demo --distill-lcm --distill-steps 0`", behaviour="exit 2: names --distill-steps, nothing written")
def test_zero_distill_steps_are_refused(tmp_path, capsys):
    assert main(["demo", "--distill-lcm", "--distill-steps", "0", "--output-dir", str(tmp_path / "d")]) == 2
    assert "--distill-steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.fault(input="`demo --distill-lcm` with `--compare-losses`, `--report-only` or `--losses`",
                   behaviour="exit 2: names the flags that do not go together, nothing written")
@pytest.mark.parametrize("extra", [["--compare-losses"], ["--report-only"], ["--losses", "ipo"]])
def test_distill_lcm_with_another_mode_s_flags_is_refused(tmp_path, capsys, extra):
    assert main(["demo", "--distill-lcm", *extra, "--output-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and extra[0] in err
    assert not (tmp_path / "d").exists()
