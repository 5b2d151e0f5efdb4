"""The DrawBench table of scripts/reproduce_drawbench.sh: (metric, model, value, source) rows named like the
published Curriculum-DPO rows, the published row right under the run's row of the same (metric, model)."""

from __future__ import annotations

import csv
import json

import pytest

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluate.drawbench import COLUMNS, table_rows, write_table

PUBLISHED_SRC = "published (Curriculum-DPO, arXiv 2405.13637)"


def _results(path, metric="hpsv21", means=None, num_prompts=200, images=10):
    means = means or {"base": 0.25, "dpo": 0.26, "cdpo": 0.27}
    entries = [{"model": m, "metric": metric, "mean": v, "num_prompts": num_prompts, "images_per_prompt": images}
               for m, v in means.items()]
    path.write_text(json.dumps({"summary": {}, "metrics": {}, "entries": entries}))
    return path


def test_rows_follow_the_published_names_with_the_published_row_beside_ours(tmp_path):
    hps = _results(tmp_path / "hps.json")
    aes = _results(tmp_path / "aes.json", "aesthetic", {"base": 5.5, "dpo": 5.6, "cdpo": 5.7})
    rows = table_rows({"hps": hps, "aesthetics": aes}, "sd")
    ours = "this run: hpsv21, 200 prompts x 10 images"
    assert rows[:4] == [
        {"metric": "HPSv2", "model": "SD 1.5", "value": 0.25, "source": ours},
        {"metric": "HPSv2", "model": "SD 1.5 (DPO)", "value": 0.26, "source": ours},
        {"metric": "HPSv2", "model": "SD 1.5 (DPO)", "value": 0.2672, "source": PUBLISHED_SRC},
        {"metric": "HPSv2", "model": "SD 1.5 (Curriculum-DPO)", "value": 0.27, "source": ours},
    ]
    assert [(r["metric"], r["model"], r["value"]) for r in rows[4:]] == [
        ("LAION aesthetics", "SD 1.5", 5.5), ("LAION aesthetics", "SD 1.5 (DPO)", 5.6),
        ("LAION aesthetics", "SD 1.5 (DPO)", 5.6205), ("LAION aesthetics", "SD 1.5 (Curriculum-DPO)", 5.7)]


@pytest.mark.parametrize("task, published", [("aesthetics", 6.043), ("hps", 0.2814), ("text_alignment", 0.572)])
def test_lcm_published_rows(tmp_path, task, published):
    rows = table_rows({task: _results(tmp_path / "r.json")}, "lcm")
    assert [r["model"] for r in rows] == ["LCM", "LCM (DPO)", "LCM (DPO)", "LCM (Curriculum-DPO)"]
    assert rows[2]["value"] == published and rows[2]["source"] == PUBLISHED_SRC


def test_markdown_csv_and_json_hold_the_same_rows(tmp_path):
    rows = table_rows({"text_alignment": _results(tmp_path / "r.json", "text_alignment")}, "sd")
    paths = write_table(rows, tmp_path / "out")
    md = paths["markdown"].read_text().splitlines()
    assert md[0] == "| metric | model | value | source |" and md[1] == "| --- | --- | --- | --- |"
    assert md[4] == f"| text alignment | SD 1.5 (DPO) | 0.6075 | {PUBLISHED_SRC} |"
    assert md[2] == "| text alignment | SD 1.5 | 0.2500 | this run: text_alignment, 200 prompts x 10 images |"
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and [float(r["value"]) for r in table] == [r["value"] for r in rows]
    data = json.loads(paths["json"].read_text())
    assert data["columns"] == list(COLUMNS) and data["rows"] == rows


@pytest.mark.fault(input="DrawBench table from a results.json that lacks one of base / dpo / cdpo",
                   behaviour="one-line error naming the file, the missing model and the models it has")
def test_missing_model_is_named(tmp_path):
    path = _results(tmp_path / "r.json", means={"base": 0.2, "dpo": 0.3})
    with pytest.raises(UserError, match=r"r.json: no model 'cdpo' \(has \['base', 'dpo'\]\)"):
        table_rows({"hps": path}, "sd")


@pytest.mark.fault(input="DrawBench table from a results.json scored with several metrics",
                   behaviour="one-line error naming the file and its metrics")
def test_several_metrics_are_refused(tmp_path):
    path = _results(tmp_path / "r.json")
    data = json.loads(path.read_text())
    data["entries"].append({**data["entries"][0], "metric": "clip"})
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"holds metrics \['clip', 'hpsv21'\]"):
        table_rows({"hps": path}, "sd")


@pytest.mark.fault(input="DrawBench table for an unknown task or a file that is not a results.json",
                   behaviour="one-line error naming the task choices / the file")
def test_unknown_task_and_bad_file(tmp_path):
    with pytest.raises(UserError, match="unknown DrawBench task 'pick'"):
        table_rows({"pick": _results(tmp_path / "r.json")}, "sd")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="bad.json: not an evaluate results.json"):
        table_rows({"hps": tmp_path / "bad.json"}, "sd")
