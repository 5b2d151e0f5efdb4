"""Writing the evaluation report: results.json, results.md, report.html and scores.jsonl.

- results.json: {"summary": ..., "metrics": {name: info}, "entries": [...]}: every entry is one
  (metric, model) number set with its metric model, version, scale, preprocessing, prompt set,
  images per prompt, seed rule and sampler.
- results.md: tables shaped like the published ones (rows: models; columns: metrics), then win rates
  against the baseline with 95% intervals, then a per-category breakdown.
- report.html: per prompt, the images of every model side by side (relative paths), with scores.
- scores.jsonl: one line per (model, metric, prompt, image): the raw per-image scores.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_dpo.runtime import write_text_atomic


def write_report(out_dir: str | os.PathLike, entries: list[dict], infos: dict[str, dict],
                 scores: dict[str, dict[str, np.ndarray]], sets: dict, baseline: str,
                 summary: dict[str, Any], html_max_prompts: int | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "html": out / "report.html",
             "scores": out / "scores.jsonl"}
    write_text_atomic(paths["json"], json.dumps({"summary": summary, "metrics": infos, "entries": entries}, indent=2))
    write_text_atomic(paths["markdown"], markdown_tables(entries, infos, list(sets), baseline, summary))
    write_text_atomic(paths["html"], html_page(out, entries, scores, sets, baseline, html_max_prompts))
    lines = []
    for metric, per_model in scores.items():
        for model, values in per_model.items():
            for p, row in enumerate(values):
                for i, v in enumerate(row):
                    lines.append(json.dumps({"model": model, "metric": metric, "prompt_index": p, "image_index": i,
                                             "score": float(v)}))
    write_text_atomic(paths["scores"], "\n".join(lines) + "\n")
    return paths


def run_summary(sets: dict, baseline: str, bootstrap: int, bootstrap_seed: int,
                implicit: dict[str, dict] | None = None) -> dict[str, Any]:
    """The "summary" of results.json: what was sampled (from the baseline's sampling.json), by which models and
    samplers, and how win rates were computed; plus the implicit-reward accuracies, if any."""
    first = sets[baseline]
    summary = {"prompt_set": first.sampling.get("prompt_set"), "prompt_source": first.sampling.get("prompt_source"),
               "num_prompts": first.num_prompts, "images_per_prompt": first.images_per_prompt,
               "seed": first.sampling.get("seed"), "seed_rule": first.sampling.get("seed_rule"),
               "baseline": baseline, "models": {n: s.sampling.get("model") for n, s in sets.items()},
               "sampler": {n: s.sampling.get("sampler") for n, s in sets.items()},
               "bootstrap_resamples": bootstrap, "bootstrap_seed": bootstrap_seed,
               "win_rule": "per prompt: mean over its images; win 1, tie 0.5, loss 0"}
    if implicit:
        summary["implicit_accuracy"] = implicit
    return summary


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.3f}"


def markdown_tables(entries: list[dict], infos: dict[str, dict], models: list[str], baseline: str,
                    summary: dict[str, Any]) -> str:
    metrics = list(infos)
    get = {(e["model"], e["metric"]): e for e in entries}
    lines = [f"# Evaluation: {summary.get('prompt_set')} ({summary.get('num_prompts')} prompts x "
             f"{summary.get('images_per_prompt')} images, seed {summary.get('seed')})", "",
             "## Mean (median) per metric", "",
             "| Model | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for model in models:
        cells = [f"{_fmt(get[model, m]['mean'])} ({_fmt(get[model, m]['median'])})" for m in metrics]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    others = [m for m in models if m != baseline]
    if others:
        lines += ["", f"## Win rate against {baseline} (per prompt, 95% bootstrap interval)", "",
                  "| Model | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
        for model in others:
            cells = []
            for m in metrics:
                w = get[model, m]["vs_baseline"]
                cells.append(f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}]")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    cat_entries = [e for e in entries if "by_category" in e and e["model"] != baseline]
    if cat_entries:
        lines += ["", f"## Win rate against {baseline} by category", ""]
        for m in metrics:
            rows = [e for e in cat_entries if e["metric"] == m]
            if not rows:
                continue
            cats = list(rows[0]["by_category"])
            lines += [f"### {m}", "", "| Model | " + " | ".join(cats) + " |", "| --- |" + " --- |" * len(cats)]
            for e in rows:
                cells = [f"{100 * e['by_category'][c]['vs_baseline_win_rate']:.1f}%" for c in cats]
                lines.append(f"| {e['model']} | " + " | ".join(cells) + " |")
            lines.append("")
    implicit = summary.get("implicit_accuracy") or {}
    if implicit:
        lines += ["", "## Implicit-reward accuracy (held-out pairs)", "", *implicit_table(implicit)]
    lines += ["", "## Metrics", ""]
    for m, info in infos.items():
        lines.append(f"- **{m}**: {info.get('model')} ({info.get('version')}); scale: {info.get('scale')}; "
                     f"preprocessing: {info.get('preprocessing')}")
    sampler = summary.get("sampler") or {}
    lines += ["", "Sampler per model: " + "; ".join(f"{k}: {json.dumps(v)}" for k, v in sampler.items()), ""]
    return "\n".join(lines)


def html_page(out: Path, entries: list[dict], scores: dict[str, dict[str, np.ndarray]], sets: dict,
              baseline: str, max_prompts: int | None) -> str:
    models = [baseline] + [m for m in sets if m != baseline]
    first = sets[models[0]]
    prompts, cats = first.prompts(), first.categories()
    metrics = list(scores)
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>diffusion-dpo evaluation</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{width:160px;height:auto;margin:1px}"
             ".p{font-weight:bold}.c{color:#666}</style></head><body>",
             "<h1>diffusion-dpo evaluation</h1>", "<h2>Summary</h2><table><tr><th>model</th>"]
    parts += [f"<th>{esc(m)} (mean)</th>" for m in metrics] + ["</tr>"]
    get = {(e["model"], e["metric"]): e for e in entries}
    for model in models:
        parts.append(f"<tr><td>{esc(model)}</td>")
        for m in metrics:
            e = get[model, m]
            win = e.get("vs_baseline")
            extra = f" (win {100 * win['win_rate']:.1f}%)" if win else ""
            parts.append(f"<td>{_fmt(e['mean'])}{extra}</td>")
        parts.append("</tr>")
    parts.append("</table><h2>Images per prompt</h2><table><tr><th>prompt</th>")
    parts += [f"<th>{esc(m)}</th>" for m in models] + ["</tr>"]
    n = len(prompts) if max_prompts is None else min(max_prompts, len(prompts))
    for p in range(n):
        parts.append(f"<tr><td><span class='p'>{p}. {esc(prompts[p])}</span><br><span class='c'>{esc(cats[p])}</span></td>")
        for model in models:
            s = sets[model]
            imgs = "".join(f"<img src='{esc(os.path.relpath(s.folder / r['file'], out))}' loading='lazy'>"
                           for r in s.records if r["prompt_index"] == p)
            sc = ", ".join(f"{m} {_fmt(float(scores[m][model][p].mean()))}" for m in metrics)
            parts.append(f"<td>{imgs}<br><span class='c'>{esc(sc)}</span></td>")
        parts.append("</tr>")
    parts.append("</table>")
    if n < len(prompts):
        parts.append(f"<p>{len(prompts) - n} more prompts not shown (--html-max-prompts {max_prompts}).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def implicit_table(implicit: dict[str, dict]) -> list[str]:
    lines = ["| Model | accuracy | pairs | ties | timesteps | mean logit (beta) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in implicit.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {r['pairs']} | {r['ties']} | {r['num_timesteps']} | "
                     f"{r['mean_inside']:.4g} ({r['beta']:g}) |")
    return lines


def write_implicit_only(out_dir: str | os.PathLike, implicit: dict[str, dict]) -> dict[str, Path]:
    """results.json and results.md when only implicit-reward accuracy was asked for."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    write_text_atomic(paths["json"], json.dumps({"summary": {"implicit_accuracy": implicit}, "metrics": {},
                                                 "entries": []}, indent=2))
    write_text_atomic(paths["markdown"], "\n".join(["# Implicit-reward accuracy (held-out pairs)", "",
                                                     *implicit_table(implicit), ""]))
    return paths
