"""`diffusion-dpo demo`: the whole Diffusion-DPO story on the miniature world, through the toolkit's own code.

    run_demo(DemoSettings(output_dir="demo_out"))   # or: diffusion-dpo demo --output-dir demo_out

Stages (each skips what is already complete, so an interrupted demo resumes where it stopped):

    1. base      the shipped miniature Stable Diffusion (demo.base), or one pretrained from scratch
    2. pairs     feedback.generate.generate_pairs on the train prompts, the hidden-taste judge as the reward
                 -> <out>/pairs/ (images, samples.jsonl, pairs.jsonl manifest)
    3. prepare   cache.prepare.prepare_cache: VAE latents + text embeddings of every pair -> <out>/cache/
    4. train     train.trainer.train twice from the same cache: Diffusion-DPO with LoRA (<out>/dpo/) and,
                 as the baseline, SFT on the winners with the same LoRA, steps and learning rate (<out>/sft/)
    5. evaluate  evaluate.sampling.sample_model for base, SFT and DPO on the held-out prompts with the same
                 seeds per (prompt, image) -> <out>/samples/; scored with the judge and the prompt-fidelity
                 check, win rates with bootstrap intervals (evaluate.scoring / stats), evaluate.report
                 -> <out>/results.json, results.md, report.html
    6. summary   <out>/grid.png (rows base / SFT / DPO, same seeds) and a table in the terminal

The settings below were chosen by measurement (docs/demo.md): they reach the targets for seeds 0 to 4 on 2 CPU
cores in about 3 minutes. `quick=True` is the reduced run of the test suite.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffusion_dpo.demo.base import DEFAULT_GUIDANCE, DEFAULT_STEPS
from diffusion_dpo.demo.world import SIZE

JUDGE_SPEC = "diffusion_dpo.demo.judge:judge_scores"
STAGES = ("base", "pairs", "prepare", "train-dpo", "train-sft", "sample", "report")


@dataclass
class DemoSettings:
    """Everything that determines the demo's outputs (written to <out>/demo.json)."""

    output_dir: str = "demo_out"
    seed: int = 0
    base: str | None = None
    """Pipeline folder of the base; None: the shipped one (or a rebuilt one with rebuild_base)."""
    rebuild_base: bool = False
    # 2. pairs: K images per train prompt, best vs worst by the judge
    train_prompts: int | None = None
    """Use the first N train prompts (None: all 108)."""
    images_per_prompt: int = 8
    pair_strategy: str = "best-worst"
    """generate-pairs strategy: best-worst, all (every pair above pair_margin) or random."""
    pair_margin: float = 0.0
    pair_steps: int = 10
    """DDIM steps when sampling the pairs."""
    # 4. training (shared by DPO and SFT, except beta)
    train_steps: int = 300
    batch_size: int = 8
    learning_rate: float = 3e-3
    lr_scheduler: str = "cosine"
    """train.lr_scheduler: cosine decay to 0 over train_steps (no warm-up)."""
    beta: float = 2000.0
    rank: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["conv1", "conv2"])
    timestep_range: tuple[int, int] = (0, 1000)
    latent_sampling: str = "mean"
    # 5. evaluation on the held-out prompts
    eval_prompts: int | None = None
    """Use the first N held-out prompts (None: all 27)."""
    eval_images: int = 8
    eval_steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    grid_prompts: int = 9
    threads: int = 2
    progress: bool = True


def quick_settings(output_dir: str, seed: int = 0) -> DemoSettings:
    """The reduced demo of the test suite: fewer prompts, images, sampling and training steps."""
    return DemoSettings(output_dir=output_dir, seed=seed, train_prompts=48, images_per_prompt=4, pair_steps=8,
                        train_steps=100, eval_prompts=9, eval_images=2, eval_steps=10, grid_prompts=5)


def _overrides(s: DemoSettings, base: str, method: str, run: str | None = None) -> list[str]:
    out = Path(s.output_dir)
    targets = "[" + ",".join(s.target_modules) + "]"
    return [
        f"model.pretrained={base}",
        f"data.source={out / 'pairs' / 'pairs.jsonl'}", "data.format=manifest", f"data.resolution={SIZE}",
        f"data.cache_dir={out / 'cache'}", "data.cache_dtype=float32", f"data.latent_sampling={s.latent_sampling}",
        f"train.method={method}", "train.finetune=lora", f"train.beta={s.beta}",
        f"train.learning_rate={s.learning_rate}", f"train.batch_size={s.batch_size}",
        f"train.max_steps={s.train_steps}", f"train.seed={s.seed}", f"train.lr_scheduler={s.lr_scheduler}",
        f"train.timestep_range=[{s.timestep_range[0]},{s.timestep_range[1]}]",
        f"train.checkpoint_every={max(1, s.train_steps // 4)}", "train.checkpoints_total_limit=1",
        f"lora.rank={s.rank}", f"lora.target_modules={targets}",
        f"output.dir={out / (run or method)}", "output.report_to=none",
    ]


def training_overrides(s: DemoSettings, base: str, method: str, run: str | None = None,
                       extra: tuple[str, ...] = ()) -> list[str]:
    """The dotted overrides of the demo's training of `method` into <out>/<run> (default <out>/<method>), with
    `extra` (a loss's own settings, say) last so they win."""
    return _overrides(s, base, method, run) + list(extra)


def training_config(s: DemoSettings, base: str, method: str, run: str | None = None, extra: tuple[str, ...] = ()):
    from diffusion_dpo.config import load_config

    return load_config(None, training_overrides(s, base, method, run, extra))


def _prompt_set(name: str, texts: list[str]):
    from diffusion_dpo.evaluate.prompts import Prompt, PromptSet

    return PromptSet(name=name, source="diffusion_dpo.demo.world", prompts=tuple(Prompt(t) for t in texts))


def fidelity_scores(images, prompts):
    """Per-image prompt fidelity (1: the asked colour and shape are there), as a metric for evaluate.scoring."""
    from diffusion_dpo.demo.fidelity import fidelity

    return fidelity(images, prompts).per_image


def demo_metrics():
    """The demo's two metrics as evaluate rewards: the hidden-taste judge and prompt fidelity, with their infos."""
    from diffusion_dpo.evaluate.rewards import CallableReward, load_reward

    judge = load_reward(JUDGE_SPEC, batch_size=64)
    judge.name, judge.info["metric"] = "judge", "judge"
    judge.info.update(scale="object vividness in [0, 1]: 0 muted, 1 the pure world colour (demo.judge)")
    fid = CallableReward(fidelity_scores, name="fidelity", batch_size=64)
    fid.info.update(model="diffusion_dpo.demo.fidelity", scale="1 if the asked colour and shape are read "
                    "from the pixels, else 0 (mean x 100 = fidelity %)")
    return judge, fid


class Demo:
    """One demo run: `stage_*` methods in order, each skipping when its output is complete."""

    def __init__(self, settings: DemoSettings, console: Any = None):
        from rich.console import Console

        self.s = settings
        self.out = Path(settings.output_dir)
        self.console = console or Console(highlight=False)
        self.timings: dict[str, float] = {}
        self.base: str = ""

    # --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        import torch

        torch.set_num_threads(self.s.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        t0 = time.perf_counter()
        steps: list[tuple[str, Callable[[], None]]] = [
            ("base", self.stage_base), ("pairs", self.stage_pairs), ("prepare", self.stage_prepare),
            ("train-dpo", lambda: self.stage_train("dpo")), ("train-sft", lambda: self.stage_train("sft")),
            ("sample", self.stage_sample), ("report", self.stage_report),
        ]
        for k, (name, fn) in enumerate(steps, 1):
            self.console.rule(f"[bold]{k}/{len(steps)} {name}")
            start = time.perf_counter()
            fn()
            self.timings[name] = round(time.perf_counter() - start, 1)
        self.timings["total"] = round(time.perf_counter() - t0, 1)
        self.results["demo"]["seconds"] = self.timings
        self._write_results()
        self.print_summary()
        return self.results

    def _check_settings(self) -> None:
        """A rerun must use the settings of the run it resumes (else stages would mix)."""
        path = self.out / "demo.json"
        record = {k: v for k, v in asdict(self.s).items() if k not in ("progress", "threads", "output_dir")}
        record = json.loads(json.dumps(record))  # tuples -> lists, as read back
        if path.exists():
            old = json.loads(path.read_text())
            diff = sorted(k for k in record if old.get(k) != record[k])
            if diff:
                from diffusion_dpo.errors import UserError

                raise UserError(f"{self.out} holds a demo run with different {', '.join(diff)}; pass another "
                                f"--output-dir (or delete {self.out}) to start a new one")
        path.write_text(json.dumps(record, indent=1))

    # --------------------------------------------------------------------------------------------
    def stage_base(self) -> None:
        from diffusion_dpo.demo.base import load_or_build_base

        self.base = str(load_or_build_base(self.s.base, rebuild=self.s.rebuild_base))
        self.console.print(f"base pipeline: {self.base}")

    def stage_pairs(self) -> None:
        from diffusion_dpo.demo.world import train_prompts
        from diffusion_dpo.feedback.generate import describe, generate_pairs
        from diffusion_dpo.feedback.reward_judge import load_judge

        texts = train_prompts()[: self.s.train_prompts]
        result = generate_pairs(self.base, _prompt_set("demo-train", texts), self.out / "pairs",
                                load_judge([JUDGE_SPEC]), images_per_prompt=self.s.images_per_prompt,
                                strategy=self.s.pair_strategy, margin=self.s.pair_margin, seed=self.s.seed,
                                scheduler="ddim", steps=self.s.pair_steps,
                                guidance=self.s.guidance, resolution=SIZE, sample_batch_size=64, chunk_size=16,
                                progress=self.s.progress)
        self.pairs = result.pairs
        self.console.print(describe(result))

    def stage_prepare(self) -> None:
        from diffusion_dpo.cache.prepare import prepare_cache

        cfg = training_config(self.s, self.base, "dpo")
        folder = prepare_cache(cfg, storage_dtype=cfg.data.cache_dtype, batch_size=64,
                               progress=self.s.progress)
        self.console.print(f"latent cache: {folder}")

    def stage_train(self, method: str) -> None:
        from diffusion_dpo.train.trainer import train

        cfg = training_config(self.s, self.base, method)
        done = Path(cfg.output.dir) / "train_summary.json"
        if done.is_file() and json.loads(done.read_text()).get("steps") == cfg.train.max_steps:
            self.console.print(f"{method}: already trained ({done})")
            return
        summary = train(cfg, progress=self.s.progress)
        acc = f", implicit accuracy {summary['implicit_acc_last10']:.2f}" if "implicit_acc_last10" in summary else ""
        self.console.print(f"{method}: {summary['steps']} steps, loss {summary.get('loss_last10', float('nan')):.4f}"
                           f"{acc} (last 10 steps) -> {cfg.output.dir}")

    def specs(self) -> list:
        from diffusion_dpo.evaluate.sampling import SampledModel

        return [SampledModel("base", self.base), SampledModel("sft", self.base, lora=str(self.out / "sft")),
                SampledModel("dpo", self.base, lora=str(self.out / "dpo"))]

    def heldout(self):
        from diffusion_dpo.demo.world import heldout_prompts

        return _prompt_set("demo-heldout", heldout_prompts()[: self.s.eval_prompts])

    def stage_sample(self) -> None:
        self.sample(self.specs())

    def sample(self, specs: list) -> None:
        """Sample `specs` on the held-out prompts into <out>/samples/<name>, the same seeds for every model."""
        from diffusion_dpo.evaluate.sampling import SamplerSettings, sample_model

        settings = SamplerSettings(scheduler="ddim", steps=self.s.eval_steps, guidance=self.s.guidance,
                                   resolution=SIZE)
        for spec in specs:
            r = sample_model(spec, self.heldout(), self.out / "samples", settings=settings,
                             images_per_prompt=self.s.eval_images, seed=self.s.seed + 1000, batch_size=64,
                             progress=self.s.progress)
            self.console.print(f"{spec.name}: {r.generated} images sampled, {r.skipped} already on disk")

    def stage_report(self) -> None:
        from diffusion_dpo.evaluate import scoring, stats

        sets = {spec.name: scoring.read_samples(self.out / "samples" / spec.name) for spec in self.specs()}
        scoring.check_comparable(list(sets.values()))
        judge, fid = demo_metrics()
        scores = {r.name: {m: scoring.score_set(r, s, batch_size=64) for m, s in sets.items()} for r in (judge, fid)}
        infos = {"judge": judge.info, "fidelity": fid.info}
        entries = scoring.compare(scores, sets, infos, "base", resamples=2000, seed=0)
        dpo_vs_sft = stats.win_rate(scores["judge"]["dpo"], scores["judge"]["sft"], 2000, seed=0)
        get = {(e["model"], e["metric"]): e for e in entries}
        models = {m: {"judge_mean": get[m, "judge"]["mean"], "judge_std": get[m, "judge"]["std"],
                      "fidelity_percent": 100.0 * get[m, "fidelity"]["mean"],
                      **({"win_rate_vs_base": get[m, "judge"]["vs_baseline"]} if m != "base" else {})}
                  for m in sets}
        w = models["dpo"]["win_rate_vs_base"]
        targets = {
            "dpo_win_rate_at_least_70": w["win_rate"] >= 0.70,
            "dpo_ci_above_50": w["ci_low"] > 0.50,
            "dpo_beats_sft": models["dpo"]["judge_mean"] > models["sft"]["judge_mean"],
            # a guard against reward hacking: DPO may not lose more than 2 points of prompt fidelity (a gain passes)
            "fidelity_drop_at_most_2_points": models["dpo"]["fidelity_percent"] >= models["base"]["fidelity_percent"] - 2.0,
        }
        first = sets["base"]
        summary = {"prompt_set": "demo-heldout", "num_prompts": first.num_prompts,
                   "images_per_prompt": first.images_per_prompt, "seed": first.sampling.get("seed"),
                   "seed_rule": first.sampling.get("seed_rule"), "baseline": "base",
                   "models": {n: s.sampling.get("model") for n, s in sets.items()},
                   "sampler": {n: s.sampling.get("sampler") for n, s in sets.items()},
                   "bootstrap_resamples": 2000, "bootstrap_seed": 0,
                   "win_rule": "per prompt: mean over its images; win 1, tie 0.5, loss 0",
                   "demo": {"settings": json.loads(json.dumps(asdict(self.s))), "models": models,
                            "dpo_vs_sft": dpo_vs_sft, "targets": targets,
                            "train": {m: self._train_summary(m) for m in ("dpo", "sft")}}}
        self.report_args = (entries, infos, scores, sets, summary)
        self.results = summary
        self._write_results()
        self.write_grid(sets)

    def _train_summary(self, method: str) -> dict:
        path = self.out / method / "train_summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_results(self) -> None:
        from diffusion_dpo.evaluate.report import write_report

        entries, infos, scores, sets, summary = self.report_args
        write_report(self.out, entries, infos, scores, sets, "base", summary)

    def write_grid(self, sets: dict, path: Path | None = None) -> Path:
        """One row per sample set (base / SFT / DPO here), one column per shown held-out prompt (its image 0: the
        same seed in every row) -> `path` (default <out>/grid.png)."""
        from PIL import Image, ImageDraw

        from diffusion_dpo.evaluate.scoring import load_image

        from diffusion_dpo.demo.world import parse_caption

        scale, label_w, head_h = 3, 40, 26
        total = sets["base"].num_prompts
        n = min(self.s.grid_prompts, total)
        columns = [k * total // n for k in range(n)]  # spread over the (sorted) prompts: every colour shows
        cell = SIZE * scale
        grid = Image.new("RGB", (label_w + n * (cell + 2), head_h + len(sets) * (cell + 2)), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        prompts = sets["base"].prompts()
        for k, p in enumerate(columns):  # column header: "red circle" / "top left"
            color, shape, position = parse_caption(prompts[p])
            draw.text((label_w + k * (cell + 2) + 2, 1), f"{color} {shape}\n{position}", fill=(0, 0, 0))
        for row, (name, s) in enumerate(sets.items()):
            y = head_h + row * (cell + 2)
            draw.text((4, y + cell // 2 - 5), name.upper() if name != "base" else "base", fill=(0, 0, 0))
            files = {r["prompt_index"]: r["file"] for r in s.records if r["image_index"] == 0}
            for k, p in enumerate(columns):
                im = load_image(s.folder / files[p]).resize((cell, cell), Image.NEAREST)
                grid.paste(im, (label_w + k * (cell + 2), y))
        path = path or self.out / "grid.png"
        grid.save(path)
        return path

    # --------------------------------------------------------------------------------------------
    def print_summary(self) -> None:
        from rich.table import Table

        d = self.results["demo"]
        table = Table(title=f"Held-out prompts: {self.results['num_prompts']} x {self.results['images_per_prompt']} "
                            f"images, same seeds for every model")
        for col in ("model", "judge (mean ± std)", "win rate vs base [95% CI]", "prompt fidelity"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for name, m in d["models"].items():
            w = m.get("win_rate_vs_base")
            win = f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}]" if w else "-"
            table.add_row(name, f"{m['judge_mean']:.3f} ± {m['judge_std']:.3f}", win, f"{m['fidelity_percent']:.1f}%")
        self.console.print(table)
        v = d["dpo_vs_sft"]
        self.console.print(f"DPO vs SFT (judge, per prompt): {100 * v['win_rate']:.1f}% "
                           f"[{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]")
        for name, ok in d["targets"].items():
            self.console.print(f"  {'[green]met[/]' if ok else '[red]NOT met[/]'}  {name}")
        t = d.get("seconds", {})
        self.console.print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
        self.console.print(f"wrote {self.out / 'results.json'}, {self.out / 'report.html'}, {self.out / 'grid.png'}")


def run_demo(settings: DemoSettings, console: Any = None) -> dict:
    return Demo(settings, console).run()
