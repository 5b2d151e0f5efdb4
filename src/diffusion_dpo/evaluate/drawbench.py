"""The DrawBench table of Curriculum-DPO (arXiv 2405.13637) next to this toolkit's runs, row for row.

The published rows are (metric, model, value) triples: "SD 1.5 (DPO)" and "LCM (DPO)" on LAION aesthetics,
HPSv2 (HPS v2.1 raw cosine) and text alignment (../shared/REFERENCE.md section 3). A run of
scripts/reproduce_drawbench.sh scores base, DPO and Curriculum-DPO with `diffusion-dpo evaluate`; this module
turns the evaluate `results.json` of each task into rows of the same shape, labelled with the same metric and
model names, and puts the published row directly under the run's row of the same (metric, model), so the two
read line by line. Output: drawbench_table.md, .csv and .json, columns metric, model, value, source.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from diffusion_dpo.errors import UserError

# task -> the metric's name in the published table
METRICS = {"aesthetics": "LAION aesthetics", "hps": "HPSv2", "text_alignment": "text alignment"}
# family -> evaluate's model folder name -> the model's name in the table
MODELS = {
    "sd": {"base": "SD 1.5", "dpo": "SD 1.5 (DPO)", "cdpo": "SD 1.5 (Curriculum-DPO)"},
    "lcm": {"base": "LCM", "dpo": "LCM (DPO)", "cdpo": "LCM (Curriculum-DPO)"},
}
# (task, family) -> the published value (Curriculum-DPO's DrawBench table, 200 prompts x 10 images)
PUBLISHED = {
    ("aesthetics", "sd"): 5.6205, ("hps", "sd"): 0.2672, ("text_alignment", "sd"): 0.6075,
    ("aesthetics", "lcm"): 6.043, ("hps", "lcm"): 0.2814, ("text_alignment", "lcm"): 0.572,
}
PUBLISHED_SOURCE = "published (Curriculum-DPO, arXiv 2405.13637)"
COLUMNS = ("metric", "model", "value", "source")


def table_rows(results: dict[str, str | Path], family: str, source: str = "this run") -> list[dict]:
    """One row per (task, model) of the run, in task order then base, DPO, Curriculum-DPO; the published
    row of a (metric, model) follows the run's row of the same name.

    results: task -> an evaluate results.json holding one metric (the task's) for models base/dpo/cdpo.
    value: the mean over all prompts x images, as the published table reports; source: `source`, the scorer's
    name and the prompts x images it averaged (the published table: 200 prompts x 10 images).
    """
    if family not in MODELS:
        raise UserError(f"unknown family {family!r}; choose one of: {', '.join(MODELS)}")
    rows: list[dict] = []
    for task, path in results.items():
        if task not in METRICS:
            raise UserError(f"unknown DrawBench task {task!r}; choose one of: {', '.join(METRICS)}")
        try:
            entries = json.loads(Path(path).read_text())["entries"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{path}: not an evaluate results.json ({err}); rerun `diffusion-dpo evaluate`") from err
        metrics = {e["metric"] for e in entries}
        if len(metrics) != 1:
            raise UserError(f"{path}: holds metrics {sorted(metrics)}; score each task with its one metric")
        by_model = {e["model"]: e for e in entries}
        for folder, label in MODELS[family].items():
            if folder not in by_model:
                raise UserError(f"{path}: no model {folder!r} (has {sorted(by_model)}); sample base, dpo and cdpo")
            e = by_model[folder]
            # the scorer and the sample size travel with the value: a toy metric or a short run shows at a glance
            where = f"{source}: {e['metric']}, {e['num_prompts']} prompts x {e['images_per_prompt']} images"
            rows.append({"metric": METRICS[task], "model": label, "value": e["mean"], "source": where})
            if folder == "dpo":
                rows.append({"metric": METRICS[task], "model": label, "value": PUBLISHED[(task, family)],
                             "source": PUBLISHED_SOURCE})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_table(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """drawbench_table.md / .csv / .json in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "drawbench_table.md", "csv": out / "drawbench_table.csv", "json": out / "drawbench_table.json"}
    paths["markdown"].write_text(to_markdown(rows))
    paths["csv"].write_text(to_csv(rows))
    paths["json"].write_text(json.dumps({"columns": list(COLUMNS), "rows": rows}, indent=2) + "\n")
    return paths


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
