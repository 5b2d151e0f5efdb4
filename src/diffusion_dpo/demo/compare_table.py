"""comparison.md of `demo --compare-losses` (demo.compare): the per-seed table, the mean over seeds, the sweep."""

from __future__ import annotations


def _pct(w: dict | None) -> str:
    return "-" if w is None else f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.0f}, {100 * w['ci_high']:.0f}]"


def _cpu(row: dict) -> str:
    return f"{row['cpu_seconds_per_step']:.3f}" if row.get("cpu_seconds_per_step") is not None else "-"


def cpu_mean(rows: list[dict]) -> str:
    """Mean CPU seconds per step over the rows that measured it (runs before it was recorded did not)."""
    v = [r["cpu_seconds_per_step"] for r in rows if r.get("cpu_seconds_per_step") is not None]
    return f"{sum(v) / len(v):.3f}" + (f" of {len(v)}" if len(v) < len(rows) else "") if v else "-"


MEASURES = ("win rates per prompt with 95% bootstrap intervals; s/step = training loop wall time / steps (CPU: the "
            "training process's CPU seconds / steps, its setup included) on {threads} torch threads (load averages in "
            "comparison.json); peak RSS = VmHWM of the training process.")
"""The measures' legend of every comparison table."""


def run_tables(rows: list[dict]) -> list[str]:
    """The per-seed table (one row per run) and the mean over seeds per loss (the "loss" column's label)."""
    lines = ["| loss | setting | seed | judge mean (base) | judge win vs base [95% CI] | win vs DPO [95% CI] | "
             "fidelity (vs base) | s/step wall (CPU) | peak RSS MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (list(result_losses(rows)).index(r["loss"]), r["seed"])):
        lines.append(f"| {r['loss']} | {r['setting'] or '-'} | {r['seed']} | {r['judge_mean']:.3f} "
                     f"({r['judge_base_mean']:.3f}) | {_pct(r['win_vs_base'])} | "
                     f"{_pct(r.get('win_vs_dpo'))} | {r['fidelity_percent']:.1f}% ({r['fidelity_change']:+.1f}) | "
                     f"{r['seconds_per_step']:.3f} ({_cpu(r)}) | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Mean over seeds:", "", "| loss | setting | seeds | judge mean | judge win vs base, mean (min-max) | "
              "win vs DPO, mean (min-max) | fidelity change, mean | s/step wall (CPU), mean | peak RSS MiB, max |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for loss, group in result_losses(rows).items():
        def span(key: str) -> str:
            v = [100 * r[key]["win_rate"] for r in group if r.get(key)]
            return f"{sum(v) / len(v):.1f}% ({min(v):.0f}-{max(v):.0f})" if v else "-"
        mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
        lines.append(f"| {loss} | {group[0]['setting'] or '-'} | {len(group)} | {mean('judge_mean'):.3f} | "
                     f"{span('win_vs_base')} | "
                     f"{span('win_vs_dpo')} | {mean('fidelity_change'):+.1f} | {mean('seconds_per_step'):.3f} ({cpu_mean(group)}) | "
                     f"{max(r['peak_rss_mb'] for r in group):.0f} |")
    return lines


def markdown(result: dict) -> str:
    """comparison.md: the per-seed table, the mean over seeds per loss, the sweep."""
    s, rows = result["settings"], result["rows"]
    d = s["demo"]
    lines = [f"Demo world, seeds {' '.join(map(str, s['seeds']))}; every loss: {d['train_steps']} steps x "
             f"{d['batch_size']} pairs, LoRA rank {d['rank']} on {'/'.join(d['target_modules'])}, lr "
             f"{d['learning_rate']:g} {d['lr_scheduler']}; held-out: {d['eval_prompts'] or 27} prompts x "
             f"{d['eval_images']} images, same seeds for every model; " + MEASURES.format(threads=s["threads"]), "",
             *run_tables(rows)]
    lines += ["", f"Sweep on seed {result['sweep_seed']} (chosen: the best judge win rate vs base among values within "
              f"{result['fidelity_guard_points']:g} points of the base's prompt fidelity):", "",
              "| loss | setting | judge mean | judge win vs base [95% CI] | win vs DPO [95% CI] | fidelity (vs base) "
              "| chosen |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for loss, sw in result["sweep"].items():
        for r in sw["rows"]:
            chosen = sw["chosen"] is not None and r["setting"] == f"{sw['key']}={sw['chosen']:g}"
            lines.append(f"| {loss} | {r['setting']} | {r['judge_mean']:.3f} | {_pct(r['win_vs_base'])} | "
                         f"{_pct(r.get('win_vs_dpo'))} | "
                         f"{r['fidelity_percent']:.1f}% ({r['fidelity_change']:+.1f}) | {'yes' if chosen else ''} |")
    incomplete = [x for x, sw in result["sweep"].items() if not sw.get("complete", True)]
    if incomplete:
        lines += ["", f"Sweep unfinished for {', '.join(incomplete)}: chosen among the values finished so far."]
    if result.get("missing"):
        lines += ["", f"Not finished yet ({len(result['missing'])} runs; rerun the command to complete): "
                  + ", ".join(result["missing"]) + "."]
    return "\n".join(lines) + "\n"


def result_losses(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by loss, in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["loss"], []).append(r)
    return out
