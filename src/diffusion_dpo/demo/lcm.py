"""`diffusion-dpo demo --distill-lcm`: a miniature latent consistency model distilled from the demo base, its
few-step quality, and Consistency-DPO on it (docs/demo.md, "A miniature LCM and Consistency-DPO").

    run_lcm_demo(LCMDemoSettings(output_dir="lcm_out", seeds=[0, 1, 2]))

Stages (each skips what is complete, so a rerun resumes):

    1. distill   demo.distill_lcm on the demo base -> <out>/lcm/ (a LatentConsistencyModelPipeline folder)
    2. quality   the 27 held-out prompts x eval_images, the demo's evaluation seeds, sampled by the teacher with
                 its usual sampler (20 DDIM steps, guidance 3), the teacher at lcm_steps DDIM steps and the LCM at
                 lcm_steps (and 1) LCM steps; judge and prompt fidelity -> <out>/quality/, quality.json
    3. per seed  <out>/seed<s>/: the demo's pair generation (feedback.generate_pairs, best vs worst of K=8 by the
                 demo's judge, the train prompts) sampled by the LCM itself (lcm_steps LCM steps: on-policy, as
                 Curriculum-DPO's LCM rows); the demo's latent cache and training settings (demo.run.training_config:
                 300 steps x 8 pairs, LoRA rank 8 on conv1/conv2, cosine; lr 3e-4) with train.method=consistency_dpo,
                 the LCM as student and reference, the base as model.teacher, w from the LCM's distillation range
                 -> cdpo/; the LCM and LCM + LoRA
                 sampled on the held-out prompts, judge win rate against the LCM with its bootstrap interval
    4. summary   <out>/lcm_results.json and lcm_results.md
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffusion_dpo.demo.base import DEFAULT_GUIDANCE, DEFAULT_STEPS
from diffusion_dpo.demo.run import JUDGE_SPEC, DemoSettings, _prompt_set, demo_metrics, training_config
from diffusion_dpo.demo.world import SIZE


@dataclass
class LCMDemoSettings:
    output_dir: str = "lcm_out"
    seeds: list[int] = field(default_factory=lambda: [0])
    base: str | None = None
    """Teacher pipeline folder (None: the shipped demo base)."""
    distill_steps: int = 200
    lcm_steps: int = 4
    guidance: float = DEFAULT_GUIDANCE
    """The pipeline's guidance scale of every sampler here (the LCM embeds w = scale - 1)."""
    train_steps: int = 300
    beta: float = 400.0
    """train.beta of consistency_dpo: 400 = Curriculum-DPO's beta_code 200 (docs/losses.md)."""
    learning_rate: float = 3e-4
    """A tenth of the demo DPO's 3e-3 (same conv-only LoRA rank 8, cosine decay): at 3e-3 the student's consistency
    distances rose to 3-7 times the reference's and prompt fidelity fell (docs/demo.md)."""
    eval_images: int = 8
    images_per_prompt: int = 8
    threads: int = 2
    progress: bool = True
    quick: bool = False
    """The test suite's reduced run: 256 distillation images, batch 4, 3 held-out and 4 train prompts, batch 2."""


def quick_lcm_settings(output_dir: str) -> LCMDemoSettings:
    """The test suite's reduced run (a few steps of everything: checks the plumbing, not the numbers)."""
    return LCMDemoSettings(output_dir=output_dir, distill_steps=3, train_steps=2, eval_images=1, images_per_prompt=2,
                           quick=True)


class LCMDemo:
    def __init__(self, s: LCMDemoSettings, console: Any = None):
        from rich.console import Console

        self.s, self.out = s, Path(s.output_dir)
        self.console = console or Console(highlight=False)
        self.quick = s.quick
        self.results: dict[str, Any] = {"settings": asdict(s), "seconds": {}}

    def run(self) -> dict:
        import torch

        from diffusion_dpo.demo.base import load_or_build_base

        torch.set_num_threads(self.s.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = str(load_or_build_base(self.s.base))
        for name, fn in [("distill", self.stage_distill), ("quality", self.stage_quality),
                         *[(f"seed{seed}", lambda seed=seed: self.stage_seed(seed)) for seed in self.s.seeds]]:
            self.console.rule(f"[bold]{name}")
            start = time.perf_counter()
            fn()
            self.results["seconds"][name] = round(time.perf_counter() - start, 1)
        self.write()
        return self.results

    # ------------------------------------------------------------------------------------------------
    def stage_distill(self) -> None:
        from diffusion_dpo.demo.distill_lcm import DistillSettings, distill

        self.lcm = self.out / "lcm"
        if not (self.lcm / "distill.json").is_file():
            kw = dict(num_images=256, batch_size=4) if self.quick else {}
            distill(DistillSettings(out=str(self.lcm), base=self.base, steps=self.s.distill_steps,
                                    threads=self.s.threads, **kw), log=self.console.print)
        record = json.loads((self.lcm / "distill.json").read_text())
        self.results["distill"] = {"seconds": record["seconds"], "settings": record["settings"],
                                   "loss_first_50": _mean(record["loss"][:50]),
                                   "loss_last_50": _mean(record["loss"][-50:])}
        self.console.print(f"LCM: {self.lcm} (distilled in {record['seconds']:.0f}s)")

    def _sampler(self, scheduler: str, steps: int):
        from diffusion_dpo.evaluate.sampling import SamplerSettings

        return SamplerSettings(scheduler=scheduler, steps=steps, guidance=self.s.guidance, resolution=SIZE)

    def _sample(self, specs: list, folder: Path, seed: int) -> dict:
        """specs: [(SampledModel, SamplerSettings)] on the held-out prompts, the same seeds -> judge and fidelity
        (metric -> model -> (P, N) scores) and the sample sets."""
        from diffusion_dpo.demo.world import heldout_prompts
        from diffusion_dpo.evaluate import scoring
        from diffusion_dpo.evaluate.sampling import sample_model

        prompts = _prompt_set("demo-heldout", heldout_prompts()[: 3 if self.quick else None])
        for spec, settings in specs:
            sample_model(spec, prompts, folder, settings=settings, images_per_prompt=self.s.eval_images,
                         seed=seed + 1000, batch_size=64, progress=self.s.progress)
        sets = {spec.name: scoring.read_samples(folder / spec.name) for spec, _ in specs}
        scoring.check_comparable(list(sets.values()))
        judge, fid = demo_metrics()
        scores = {r.name: {m: scoring.score_set(r, x, batch_size=64) for m, x in sets.items()} for r in (judge, fid)}
        return {"scores": scores, "sets": sets, "infos": {"judge": judge.info, "fidelity": fid.info}}

    def _table(self, sampled: dict, baseline: str) -> dict:
        from diffusion_dpo.evaluate import scoring

        entries = scoring.compare(sampled["scores"], sampled["sets"], sampled["infos"], baseline, 2000, seed=0)
        get = {(e["model"], e["metric"]): e for e in entries}
        return {m: {"judge_mean": get[m, "judge"]["mean"], "fidelity_percent": 100.0 * get[m, "fidelity"]["mean"],
                    "sampler": sampled["sets"][m].sampling.get("sampler"),
                    **({"judge_win_vs_" + baseline: get[m, "judge"]["vs_baseline"]} if m != baseline else {})}
                for m in sampled["sets"]}

    def stage_quality(self) -> None:
        from diffusion_dpo.evaluate.sampling import SampledModel

        k = self.s.lcm_steps
        specs = [(SampledModel("teacher", self.base), self._sampler("ddim", DEFAULT_STEPS)),
                 (SampledModel(f"teacher-ddim{k}", self.base), self._sampler("ddim", k)),
                 (SampledModel(f"lcm-{k}step", str(self.lcm)), self._sampler("lcm", k)),
                 (SampledModel("lcm-1step", str(self.lcm)), self._sampler("lcm", 1))]
        self.results["quality"] = self._table(self._sample(specs, self.out / "quality", 0), "teacher")
        (self.out / "quality.json").write_text(json.dumps(self.results["quality"], indent=1))

    def consistency_overrides(self) -> tuple[str, ...]:
        """The teacher, and w drawn from the range the LCM was distilled on (the method's default, Curriculum-DPO's
        [5, 15], is Dreamshaper's: outside it the miniature's guidance embedding was never trained)."""
        d = json.loads((self.lcm / "distill.json").read_text())["settings"]
        return (f"model.teacher={self.base}", f"loss.guidance_range=[{d['w_min']},{d['w_max']}]")

    def stage_seed(self, seed: int) -> None:
        from diffusion_dpo.cache.prepare import prepare_cache
        from diffusion_dpo.demo.world import train_prompts
        from diffusion_dpo.evaluate.sampling import SampledModel
        from diffusion_dpo.feedback.generate import describe, generate_pairs
        from diffusion_dpo.feedback.reward_judge import load_judge
        from diffusion_dpo.train.trainer import train

        folder = self.out / f"seed{seed}"
        ds = DemoSettings(output_dir=str(folder), seed=seed, base=str(self.lcm), train_steps=self.s.train_steps,
                          beta=self.s.beta, learning_rate=self.s.learning_rate,
                          images_per_prompt=self.s.images_per_prompt, threads=self.s.threads,
                          progress=self.s.progress)
        if self.quick:
            ds = replace(ds, train_prompts=4, batch_size=2)
        result = generate_pairs(str(self.lcm), _prompt_set("demo-train", train_prompts()[: ds.train_prompts]),
                                folder / "pairs", load_judge([JUDGE_SPEC]), images_per_prompt=ds.images_per_prompt,
                                strategy=ds.pair_strategy, margin=ds.pair_margin, seed=seed, scheduler="lcm",
                                steps=self.s.lcm_steps, guidance=self.s.guidance, resolution=SIZE,
                                sample_batch_size=64, chunk_size=16, progress=self.s.progress)
        if result is not None:
            self.console.print(describe(result))
        cfg = training_config(ds, str(self.lcm), "consistency_dpo", run="cdpo", extra=self.consistency_overrides())
        prepare_cache(cfg, storage_dtype=cfg.data.cache_dtype, batch_size=64, progress=self.s.progress)
        done = Path(cfg.output.dir) / "train_summary.json"
        if not (done.is_file() and json.loads(done.read_text()).get("steps") == cfg.train.max_steps):
            train(cfg, progress=self.s.progress)
        summary = json.loads(done.read_text())
        k = self.s.lcm_steps
        specs = [(SampledModel("lcm", str(self.lcm)), self._sampler("lcm", k)),
                 (SampledModel("cdpo", str(self.lcm), lora=cfg.output.dir), self._sampler("lcm", k))]
        table = self._table(self._sample(specs, folder / "samples", seed), "lcm")
        self.results[f"seed{seed}"] = {"models": table, "train": {key: summary.get(key) for key in
                                       ("steps", "loss_last10", "implicit_acc_last10", "seconds")}}

    # ------------------------------------------------------------------------------------------------
    def write(self) -> None:
        (self.out / "lcm_results.json").write_text(json.dumps(self.results, indent=1))
        lines = ["| model | sampler | judge mean | judge win vs baseline [95% CI] | prompt fidelity |",
                 "| --- | --- | --- | --- | --- |"]
        rows = [("quality", self.results["quality"])] + [(k, v["models"]) for k, v in self.results.items()
                                                         if k.startswith("seed")]
        for group, table in rows:
            for name, m in table.items():
                win = next((v for key, v in m.items() if key.startswith("judge_win_vs_")), None)
                win_s = f"{100 * win['win_rate']:.1f}% [{100 * win['ci_low']:.1f}, {100 * win['ci_high']:.1f}]" \
                    if win else "(baseline)"
                smp = m["sampler"]
                lines.append(f"| {group}: {name} | {smp['scheduler']} {smp['steps']} steps, "
                             f"guidance {smp['guidance']:g} "
                             f"| {m['judge_mean']:.3f} | {win_s} | {m['fidelity_percent']:.1f}% |")
        (self.out / "lcm_results.md").write_text("\n".join(lines) + "\n")
        self.console.print("\n".join(lines))


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def run_lcm_demo(settings: LCMDemoSettings, console: Any = None) -> dict:
    return LCMDemo(settings, console).run()
