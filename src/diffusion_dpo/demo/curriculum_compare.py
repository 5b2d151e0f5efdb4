"""`diffusion-dpo demo --compare-curriculum`: Curriculum-DPO against DPO on the demo world, the same reward-ranked
pairs and step budget, for several seeds, in one table (docs/curriculum.md, "Curriculum-DPO vs DPO on the demo
world").

    compare_curriculum(CurriculumCompareSettings(output_dir="curriculum_out"))

Per seed s, <out>/seed<s>/ is a demo folder (demo.run.Demo with seed s) whose pairs are made as Curriculum-DPO
makes them: `generate-pairs --strategy all-ranked` (feedback.generate) on the demo base, K images per train prompt
scored by the demo's judge, every within-prompt pair with a judge gap >= `margin`, each with its rank difference
and score gap. From that one pairs.jsonl, with the demo's DPO settings (steps, batch, LoRA, lr schedule, beta,
seed), two runs train:

    dpo          every pair from the first step (train.curriculum.enabled=false)
    curriculum   train.curriculum.enabled=true, `levels` levels by `difficulty`, steps_per_level = steps // levels
                 (as the DrawBench recipes: B x K = the step budget, so the last level trains K steps too)

Both train from the manifest, encoding on the fly (the curriculum reads each pair's columns there; a prepared
latent cache keeps none), each in its own process (demo.compare.train_in_child). Both are sampled on the held-out
prompts with the demo's sampler and seeds and scored by the judge and prompt fidelity (demo.compare.Comparison):
judge win rate against the base and Curriculum-DPO against DPO head to head, with 95% bootstrap intervals over
prompts. Finished runs and samples are not redone: the command resumes.

Outputs: <out>/comparison.md, comparison.json (rows, per-seed pair counts per level, the settings),
<out>/grid_seed<s>.png (rows base / DPO / Curriculum-DPO).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from diffusion_dpo.demo.compare import CompareSettings, Comparison, demo_settings
from diffusion_dpo.demo.run import DemoSettings

ARMS = ("dpo", "curriculum")
LABELS = {"dpo": "dpo", "curriculum": "curriculum-dpo"}


@dataclass
class CurriculumCompareSettings(CompareSettings):
    losses: list[str] = field(default_factory=lambda: ["dpo"])
    """(Unused here: the arms are ARMS.)"""
    # a reduced demo (docs/curriculum.md: the full size did not fit the 2-core machine's time), the same for both
    # arms; quick keeps quick_settings' prompts and images
    train_prompts: int | None = 54
    """The first N of the 108 train prompts (None: all)."""
    pair_images: int = 6
    """K images per train prompt: with B = 5 levels, level k holds exactly the pairs of rank difference 6 - k."""
    train_steps: int | None = 150
    """The step budget of both arms (None: the demo's 300)."""
    eval_images: int = 4
    """Images per held-out prompt (the demo samples 8)."""
    margin: float = 0.1
    """Pairs keep a judge gap >= margin: 0.4 x the judge's std over the base's samples (0.25), set before any run,
    as the paper's aesthetics threshold 0.2 is a fraction of its reward's spread; not tuned."""
    levels: int = 5
    """B, the curriculum's levels (the paper's 5)."""
    difficulty: str = "rank_difference"
    """train.curriculum.difficulty: rank_difference (the paper) or score_gap (its public code)."""

    def __post_init__(self) -> None:
        from diffusion_dpo.errors import ConfigError

        super().__post_init__()
        if self.pair_images < 2 or (self.train_prompts is not None and self.train_prompts < 1):
            raise ConfigError(f"--pair-images must be >= 2 and --train-prompts >= 1, got {self.pair_images} and "
                              f"{self.train_prompts}")
        if self.margin < 0:
            raise ConfigError(f"--pair-margin must be >= 0, got {self.margin}")
        if self.levels < 1:
            raise ConfigError(f"--levels must be >= 1, got {self.levels}")
        if self.difficulty not in ("rank_difference", "score_gap"):
            raise ConfigError(f"difficulty {self.difficulty!r}: choose rank_difference or score_gap")


def steps_per_level(s: DemoSettings, levels: int) -> int:
    """K = the step budget / B, so every level, the last included, trains K steps (at least 1)."""
    return max(1, s.train_steps // levels)


def curriculum_overrides(c: CurriculumCompareSettings, s: DemoSettings) -> tuple[str, ...]:
    return ("train.curriculum.enabled=true", f"train.curriculum.difficulty={c.difficulty}",
            f"train.curriculum.levels={c.levels}", f"train.curriculum.steps_per_level={steps_per_level(s, c.levels)}")


class CurriculumComparison(Comparison):
    PREPARE_CACHE = False  # both arms train from pairs.jsonl (the curriculum needs its columns)

    c: CurriculumCompareSettings

    def settings(self, seed: int) -> DemoSettings:
        s = replace(demo_settings(self.c, seed), pair_strategy="all-ranked", pair_margin=self.c.margin)
        if self.c.quick:
            return s
        return replace(s, train_prompts=self.c.train_prompts, images_per_prompt=self.c.pair_images)

    def run(self, seed: int, loss: str, value: float | None) -> dict:
        """One arm (`loss` is "dpo" or "curriculum") on one seed: its table row."""
        s = self.settings(seed)
        # on the fly from the manifest for both arms: the same data path, so only the order differs
        extra = ("data.cache_dir=null",) + (curriculum_overrides(self.c, s) if loss == "curriculum" else ())
        setting = None if loss == "dpo" else (f"{self.c.difficulty}, B={self.c.levels}, "
                                              f"K={steps_per_level(s, self.c.levels)}")
        return self.train_and_score(seed, LABELS[loss], "dpo", loss, extra, setting)

    def pairs_record(self, seed: int) -> dict:
        """The seed's pairs file (path, sha256, count) and its pairs per curriculum level."""
        from diffusion_dpo.train.curriculum import difficulty_levels

        path = Path(self.settings(seed).output_dir) / "pairs" / "pairs.jsonl"
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        # difficulty_levels reads a record's meta and key only: the manifest's rows are that meta
        levels = difficulty_levels([SimpleNamespace(meta=r, key=r["key"]) for r in rows], self.c.difficulty,
                                   self.c.levels, str(path))
        return {"file": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(), "pairs": len(rows),
                "per_level": [levels.count(k) for k in range(1, self.c.levels + 1)]}

    def compare(self) -> dict:
        import torch

        torch.set_num_threads(self.c.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tasks = [(seed, arm, None) for seed in self.c.seeds for arm in ARMS]
        if not self.c.report_only:
            self.do(tasks)
        rows = [self.run(*task) for task in tasks if self.ready(task)]
        seeds = sorted({r["seed"] for r in rows})
        s = self.settings(self.c.seeds[0])
        record = {**asdict(self.c), "demo": asdict(s), "steps_per_level": steps_per_level(s, self.c.levels)}
        result = {"settings": record,
                  "pairs": {str(seed): self.pairs_record(seed) for seed in seeds}, "rows": rows,
                  "missing": [f"seed{seed}/{arm}" for seed, arm, _ in tasks if not self.ready((seed, arm, None))],
                  "wall_seconds": round(time.perf_counter() - t0, 1)}
        record.pop("losses"), record["demo"].pop("seed"), record["demo"].pop("output_dir")
        (self.out / "comparison.json").write_text(json.dumps(result, indent=1, default=float))
        (self.out / "comparison.md").write_text(markdown(result))
        for seed in seeds:
            self.write_grid(seed, [r["run"] for r in rows if r["seed"] == seed])
        self.console.print((self.out / "comparison.md").read_text())
        return result


def markdown(result: dict) -> str:
    """comparison.md: the settings, the pairs per seed and level, the per-seed and mean tables."""
    from diffusion_dpo.demo.compare_table import MEASURES, run_tables

    s = result["settings"]
    d = s["demo"]
    lines = [f"Demo world, seeds {' '.join(map(str, s['seeds']))}; pairs: `generate-pairs --strategy all-ranked`, "
             f"{d['train_prompts'] or 108} train prompts x K={d['images_per_prompt']} images ({d['pair_steps']} DDIM "
             f"steps), every within-prompt pair with a judge gap >= {d['pair_margin']:g}; both arms: the same pairs, "
             f"{d['train_steps']} steps x {d['batch_size']} pairs, beta {d['beta']:g}, LoRA rank {d['rank']} on "
             f"{'/'.join(d['target_modules'])}, lr {d['learning_rate']:g} {d['lr_scheduler']}; curriculum: "
             f"{s['difficulty']}, B={s['levels']} levels, K={s['steps_per_level']} steps per level, cumulative; "
             f"held-out: {d['eval_prompts'] or 27} prompts x {d['eval_images']} images, same seeds for every model; "
             f"win vs DPO = Curriculum-DPO against DPO head to head; " + MEASURES.format(threads=s["threads"]), "",
             "| seed | pairs | pairs per level (1 = easiest) | sha256 of pairs.jsonl |", "| --- | --- | --- | --- |"]
    for seed, p in result["pairs"].items():
        lines.append(f"| {seed} | {p['pairs']} | {' / '.join(map(str, p['per_level']))} | {p['sha256'][:16]} |")
    lines += ["", *run_tables(result["rows"])]
    if result.get("missing"):
        lines += ["", f"Not finished yet ({len(result['missing'])} runs; rerun the command to complete): "
                  + ", ".join(result["missing"]) + "."]
    return "\n".join(lines) + "\n"


def compare_curriculum(settings: CurriculumCompareSettings, console: Any = None) -> dict:
    return CurriculumComparison(settings, console).compare()
