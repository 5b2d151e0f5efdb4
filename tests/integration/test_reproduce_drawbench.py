"""scripts/reproduce_drawbench.sh end to end on tiny models, offline: pairs -> DPO and Curriculum-DPO ->
DrawBench sampling of base, DPO, Curriculum-DPO -> the task's metric -> one table beside the published rows.
A toy reward stands in for the real scorers and a local prompt file for the DrawBench download."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "scripts" / "reproduce_drawbench.sh"
TOY = "diffusion_dpo.feedback.toy_rewards:brightness"
PUBLISHED = "published (Curriculum-DPO, arXiv 2405.13637)"


def _run(tmp_path, *args) -> subprocess.CompletedProcess:
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\na green square\n")
    env = {**os.environ, "DIFFUSION_DPO": f"{sys.executable} -m diffusion_dpo.cli", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", str(SCRIPT), "--tiny", "--prompts", str(tmp_path / "prompts.txt"),
                           "--pair-images", "2", "--eval-images", "2", "--reward", TOY, "--margin", "0",
                           "--out", str(tmp_path / "run"), *args], env=env, capture_output=True, text=True, timeout=300)


def _check(run: Path, task_dir: str, metric: str, names: list[str], published: float) -> None:
    ours = f"this run: {TOY}, 3 prompts x 2 images"
    rows = json.loads((run / "drawbench_table.json").read_text())["rows"]
    assert [(r["metric"], r["model"], r["source"]) for r in rows] == [
        (metric, names[0], ours), (metric, names[1], ours), (metric, names[1], PUBLISHED), (metric, names[2], ours)]
    assert rows[2]["value"] == published
    # the run's values are the evaluate means of the three sampled models
    entries = {e["model"]: e["mean"] for e in
               json.loads((run / task_dir / "report" / "results.json").read_text())["entries"]}
    assert [rows[i]["value"] for i in (0, 1, 3)] == [entries["base"], entries["dpo"], entries["cdpo"]]
    assert all(0 < v < 1 for v in entries.values())  # brightness in (0, 1)
    with (run / "drawbench_table.csv").open() as f:
        assert [(r["metric"], r["model"]) for r in csv.DictReader(f)] == [(r["metric"], r["model"]) for r in rows]
    assert f"| {metric} | {names[1]} | {published:.4f} | {PUBLISHED} |" in (run / "drawbench_table.md").read_text()
    # both trainings ran on the generated all-ranked pairs; the curriculum one logged its levels
    pairs = [json.loads(x) for x in (run / task_dir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["images_per_prompt"] == 2 and p["rank_difference"] == 1 for p in pairs)
    dpo = [json.loads(x) for x in (run / task_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    cdpo = [json.loads(x) for x in (run / task_dir / "cdpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(dpo) == len(cdpo) == 4 and "curriculum_level" not in dpo[0]
    assert [r["curriculum_level"] for r in cdpo] == [1, 1, 2, 2]
    for name in ("base", "dpo", "cdpo"):
        assert len(list((run / task_dir / "samples" / name).glob("*.png"))) == 6  # 3 prompts x 2 images


def test_sd_hps_run_makes_the_table_beside_the_published_row(tmp_path, tiny_sd):
    proc = _run(tmp_path, "--family", "sd", "--task", "hps", "--base", str(tiny_sd))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(tmp_path / "run", "hps", "HPSv2", ["SD 1.5", "SD 1.5 (DPO)", "SD 1.5 (Curriculum-DPO)"], 0.2672)


@pytest.mark.slow
def test_lcm_consistency_dpo_run(tmp_path, tiny_lcm, tiny_sd):
    proc = _run(tmp_path, "--family", "lcm", "--task", "aesthetics", "--base", str(tiny_lcm), "--teacher", str(tiny_sd))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(tmp_path / "run", "aesthetics", "LAION aesthetics", ["LCM", "LCM (DPO)", "LCM (Curriculum-DPO)"], 6.043)
    config = (tmp_path / "run" / "aesthetics" / "dpo" / "config.yaml").read_text()
    assert "consistency_dpo" in config and str(tiny_sd) in config


@pytest.mark.fault(input="`reproduce_drawbench.sh` with an unknown `--task`",
                   behaviour="one-line error naming the flag and the choices; exit 2, nothing run")
def test_unknown_task_is_refused(tmp_path):
    proc = _run(tmp_path, "--task", "pickscore")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --task pickscore: choose aesthetics, hps, text_alignment or all")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family, config, preset, base", [
    ("sd", "drawbench_sd15_dpo", "drawbench-sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("lcm", "drawbench_lcm_dpo", "drawbench-lcm", "SimianLuo/LCM_Dreamshaper_v7")])
def test_dry_run_shows_the_real_checkpoint_protocol(tmp_path, family, config, preset, base):
    """The defaults on the real checkpoints (printed, not run): K = 50, each task's reward and threshold, the
    shipped recipe, DPO then Curriculum-DPO, the DrawBench preset with 10 images per prompt, one table."""
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--family", family, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [x.split() for x in proc.stdout.splitlines() if not x.startswith("==")]
    assert len(lines) == 3 * 4 + 1 and not (tmp_path / "r").exists()
    for i, (task, reward, margin) in enumerate([("aesthetics", "aesthetic", "0.2"), ("hps", "hpsv21", "0.02"),
                                                ("text_alignment", "text_alignment", "0.02")]):
        gen, dpo, cdpo, evaluate = lines[4 * i: 4 * i + 4]
        assert gen[1:3] == ["generate-pairs", "--base"] and gen[3] == base
        for flag, value in [("--prompts", "drawbench"), ("--preset", preset), ("-k", "50"), ("--reward", reward),
                            ("--strategy", "all-ranked"), ("--margin", margin)]:
            assert gen[gen.index(flag) + 1] == value, flag
        assert dpo[dpo.index("--config") + 1] == str(REPO / "configs" / f"{config}_{task}.yaml")
        assert (REPO / "configs" / f"{config}_{task}.yaml").is_file()
        assert cdpo == dpo[:-1] + ["train.curriculum.enabled=true", dpo[-1].replace("/dpo", "/cdpo")]
        assert ("model.teacher=Lykon/dreamshaper-7" in dpo) == (family == "lcm")
        for flag, value in [("--preset", preset), ("--images-per-prompt", "10"), ("--metrics", reward)]:
            assert evaluate[evaluate.index(flag) + 1] == value, flag
    table = lines[-1]
    assert table[1].endswith("drawbench_table.py") and table[table.index("--family") + 1] == family
    assert [a.split("=")[0] for a in table[-3:]] == ["aesthetics", "hps", "text_alignment"]
