"""Run `diffusion-dpo demo` for seeds 0, 1 and 2 (one output folder each) and print one table of all three.

    python scripts/demo_seeds.py --output-root demo_seeds          # about 3 x the demo's wall time
    python scripts/demo_seeds.py --output-root demo_seeds --seeds 0 1 2 3

Each seed runs in-process through the same code as the command (diffusion_dpo.demo.run) and resumes
like it. The table (also written as <output-root>/seeds.json) gives, per seed: DPO's judge win rate
against the base with its 95% bootstrap interval, the judge means of base / SFT / DPO, DPO's win rate
against SFT, prompt fidelity of base and DPO, the targets and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", default="demo_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the reduced demo (for a fast look)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from diffusion_dpo.demo.run import DemoSettings, quick_settings, run_demo

    console = Console(highlight=False)
    rows = []
    for seed in args.seeds:
        out = str(Path(args.output_root) / f"seed{seed}")
        s = quick_settings(out, seed) if args.quick else DemoSettings(output_dir=out, seed=seed)
        s = replace(s, threads=args.threads, progress=False)
        console.rule(f"[bold]seed {seed} -> {out}")
        t0 = time.perf_counter()
        d = run_demo(s, console)["demo"]
        m = d["models"]
        rows.append({"seed": seed, "win": m["dpo"]["win_rate_vs_base"], "sft_win": m["sft"]["win_rate_vs_base"],
                     "dpo_vs_sft": d["dpo_vs_sft"], "judge": {k: v["judge_mean"] for k, v in m.items()},
                     "fidelity": {k: v["fidelity_percent"] for k, v in m.items()}, "targets": d["targets"],
                     "seconds": d["seconds"]["total"], "wall_seconds": round(time.perf_counter() - t0, 1)})

    def pct(w: dict) -> str:
        return f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}]"

    table = Table(title="diffusion-dpo demo, held-out prompts (judge = hidden taste)")
    for col in ("seed", "DPO win vs base [95% CI]", "SFT win vs base", "DPO win vs SFT", "judge base / SFT / DPO",
                "fidelity base / SFT / DPO", "targets", "wall time"):
        table.add_column(col)
    for r in rows:
        j, f = r["judge"], r["fidelity"]
        table.add_row(str(r["seed"]), pct(r["win"]), pct(r["sft_win"]), pct(r["dpo_vs_sft"]),
                      f"{j['base']:.3f} / {j['sft']:.3f} / {j['dpo']:.3f}",
                      f"{f['base']:.1f} / {f['sft']:.1f} / {f['dpo']:.1f}%",
                      f"{sum(r['targets'].values())}/{len(r['targets'])}", f"{r['seconds']:.0f} s")
    console.print(table)
    Path(args.output_root).mkdir(parents=True, exist_ok=True)
    (Path(args.output_root) / "seeds.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(all(r["targets"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
