"""`diffusion-dpo demo --compare-losses`: every loss of losses.LOSSES trained on the demo world with the same pairs
and budget as the demo's DPO, for several seeds, in one table (docs/losses.md, "How the losses compare").

    compare_losses(CompareSettings(output_dir="compare_out"))   # diffusion-dpo demo --compare-losses

Per seed s, <out>/seed<s>/ is a demo folder (demo.run.Demo with seed s: its base, pairs and latent cache), and
every loss trains from that cache with the demo's DPO settings (steps, batch, LoRA targets, lr schedule, seed)
into <out>/seed<s>/<run>/, in its own process so that its peak memory (VmHWM) is its own. Each run is sampled on
the held-out prompts with the demo's sampler and seeds (<out>/seed<s>/samples/<run>/) and scored by the demo's
judge and prompt-fidelity check. A finished run (train_summary.json at the full step count, samples on disk) is
not redone on rerun: the command resumes.

Tuning: each loss's main hyperparameter (SWEEPS) is swept on seed 0 only; the value with the best judge win
rate against the base among those that keep prompt fidelity within 2 points of the base (the demo's guard
against reward hacking) is then used for every seed. DPO keeps the demo's beta (tuned in docs/demo.md); SFT
has none.

Outputs: <out>/comparison.md and comparison.json (the table, per loss and seed, the sweep, the settings),
<out>/grid_seed<s>.png (rows base / DPO / each loss, the same seeds and prompts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffusion_dpo.demo.run import DemoSettings, quick_settings

SWEEP_SEED = 0
FIDELITY_GUARD = 2.0
"""Points of prompt fidelity a tuned value may lose against the base (as the demo's target)."""

# loss -> (the dotted key swept, its short name in run folders, values): the middle value is the default (beta =
# the demo's 2000; the loss.* defaults of losses/) with one lower and one higher, except mapo, whose official
# default 0.1 is the lowest.
SWEEPS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "ipo": ("train.beta", "beta", (500.0, 2000.0, 8000.0)),
    "hinge": ("train.beta", "beta", (500.0, 2000.0, 8000.0)),
    "kto": ("train.beta", "beta", (500.0, 2000.0, 8000.0)),
    "cdpo": ("loss.label_smoothing", "eps", (0.05, 0.1, 0.25)),
    "rdpo": ("loss.label_smoothing", "eps", (0.05, 0.1, 0.25)),
    "mapo": ("loss.mapo_weight", "lambda", (0.1, 1.0, 10.0)),
    "simpo": ("loss.simpo_gamma", "gamma", (0.0, 0.5, 2.0)),
}


def default_losses() -> list[str]:
    """Every loss of losses.LOSSES: all of them train on pairs (kto reads winners as desirable and losers as
    undesirable singles, sft the winners only)."""
    from diffusion_dpo.losses import LOSSES

    return list(LOSSES)


@dataclass
class CompareSettings:
    output_dir: str = "compare_out"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    losses: list[str] = field(default_factory=default_losses)
    quick: bool = False
    """The reduced demo (quick_settings) with `train_steps` steps and the first two values of each sweep."""
    train_steps: int | None = None
    """None: the demo's (300; quick: 100)."""
    eval_images: int = 4
    """Images per held-out prompt (the demo samples 8; 4 halves the sampling of 9 losses x 3 seeds)."""
    threads: int = 2
    progress: bool = False
    report_only: bool = False
    """Train nothing: write the table from the runs finished so far (workers may still be running)."""

    def __post_init__(self) -> None:
        from diffusion_dpo.errors import ConfigError
        from diffusion_dpo.losses import LOSSES

        unknown = [x for x in self.losses if x not in LOSSES]
        if unknown:
            raise ConfigError(f"--losses: unknown {', '.join(unknown)}; choose from {' '.join(LOSSES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct seeds, got {self.seeds}")
        # DPO is every table's reference row (win vs DPO), so it always runs, first
        self.losses = ["dpo"] + [x for x in dict.fromkeys(self.losses) if x != "dpo"]


def demo_settings(c: CompareSettings, seed: int) -> DemoSettings:
    out = str(Path(c.output_dir) / f"seed{seed}")
    # quick: the test suite's reduced demo, on half its train prompts (pairs are most of a 3-step run's time)
    s = replace(quick_settings(out, seed), train_prompts=24) if c.quick else DemoSettings(output_dir=out, seed=seed)
    s = replace(s, eval_images=min(c.eval_images, s.eval_images), threads=c.threads, progress=c.progress)
    return replace(s, train_steps=c.train_steps) if c.train_steps else s


def run_name(loss: str, value: float | None) -> str:
    return loss if value is None else f"{loss}-{SWEEPS[loss][1]}{value:g}"


def sweep_values(c: CompareSettings, loss: str) -> tuple[float, ...]:
    values = SWEEPS[loss][2]
    return values[:2] if c.quick else values


def setting_override(loss: str, value: float | None) -> tuple[str, ...]:
    return () if value is None else (f"{SWEEPS[loss][0]}={value:g}",)


# --------------------------------------------------------------------------------------------------------
def train_in_child(overrides: list[str], out_dir: Path, threads: int) -> dict:
    """Train in a fresh process (peak RSS = this run's alone) -> its measure.json, unless already finished."""
    from diffusion_dpo.errors import UserError

    measure = out_dir / "measure.json"
    summary = out_dir / "train_summary.json"
    max_steps = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.max_steps=")))
    if measure.is_file() and summary.is_file() and json.loads(summary.read_text()).get("steps") == max_steps:
        return json.loads(measure.read_text())
    log = out_dir.parent / "logs" / f"{out_dir.name}.log"  # not in out_dir: the trainer wants it empty or its own
    log.parent.mkdir(parents=True, exist_ok=True)
    job = json.dumps({"overrides": overrides, "threads": threads})
    # the child imports the same diffusion_dpo as this process (a source checkout on PYTHONPATH, say)
    import diffusion_dpo

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(diffusion_dpo.__file__).parents[1])] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "diffusion_dpo.demo.compare", job], stdout=f, stderr=f, env=env)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"training into {out_dir} failed ({tail[0]}); see {log}, then rerun the same command")
    return json.loads(measure.read_text())


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(job_json: str) -> int:
    """The child's side of train_in_child: train, then write measure.json next to train_summary.json."""
    import torch

    from diffusion_dpo.bench.measure import rss_mb
    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import train

    job = json.loads(job_json)
    torch.set_num_threads(job["threads"])
    cfg = load_config(None, job["overrides"])
    load_before = os.getloadavg()[0]
    cpu_before = _cpu_seconds()
    summary = train(cfg, progress=False)
    steps = max(1, summary["steps_this_run"])
    # wall time moves with the machine's load; CPU time much less (it includes the run's setup: model loading)
    measure = {"seconds_per_step": summary["seconds"] / steps, "steps_timed": summary["steps_this_run"],
               "cpu_seconds_per_step": (_cpu_seconds() - cpu_before) / steps,
               "peak_rss_mb": rss_mb("VmHWM"), "threads": job["threads"],
               "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "loss_last10": summary.get("loss_last10"), "implicit_acc_last10": summary.get("implicit_acc_last10")}
    (Path(cfg.output.dir) / "measure.json").write_text(json.dumps(measure, indent=1))
    return 0


# --------------------------------------------------------------------------------------------------------
class Comparison:
    PREPARE_CACHE = True  # the demo's latent cache per seed (demo.curriculum_compare trains from the manifest)

    def __init__(self, settings: CompareSettings, console: Any = None):
        from rich.console import Console

        self.demos: dict[int, Any] = {}  # seed -> its Demo (pairs, cache, base samples)
        self.scores: dict[tuple[int, str], dict] = {}  # (seed, run) -> judge and fidelity scores
        self.c, self.out = settings, Path(settings.output_dir)
        self.console = console or Console(highlight=False)

    def demo(self, seed: int):
        """The seed's demo folder with base, pairs and cache ready (each stage resumes)."""
        if seed not in self.demos:
            from diffusion_dpo.demo.run import Demo

            d = Demo(self.settings(seed), self.console)
            d.out.mkdir(parents=True, exist_ok=True)
            lock = d.out / "logs" / "setup.lock"
            while not try_lock(lock):  # another worker is building this seed's pairs
                time.sleep(5)
            done = d.out / "logs" / "setup.done"
            try:
                d._check_settings()
                d.stage_base()
                # once complete, not rerun: resuming generate-pairs rewrites the manifest, which changes the cache
                # key under the trainings other workers may be starting
                if not done.is_file():
                    self.console.rule(f"[bold]seed {seed}: base, pairs, cache -> {d.out}")
                    d.stage_pairs()
                    if self.PREPARE_CACHE:
                        d.stage_prepare()
                    d.sample(self._specs(d, ["base"]))
                    done.touch()
            finally:
                lock.unlink(missing_ok=True)
            self.demos[seed] = d
        return self.demos[seed]

    def settings(self, seed: int) -> DemoSettings:
        return demo_settings(self.c, seed)  # the seed's folder, pairs, training and evaluation

    @staticmethod
    def _specs(d, names: list[str]) -> list:
        from diffusion_dpo.evaluate.sampling import SampledModel

        return [SampledModel(n, d.base) if n == "base" else SampledModel(n, d.base, lora=str(d.out / n)) for n in names]

    def run(self, seed: int, loss: str, value: float | None) -> dict:
        """Train (unless done), sample (unless on disk) and score one loss x setting x seed: its table row."""
        setting = None if value is None else f"{SWEEPS[loss][0]}={value:g}"
        return self.train_and_score(seed, loss, loss, run_name(loss, value), setting_override(loss, value), setting)

    def train_and_score(self, seed: int, label: str, method: str, name: str, extra: tuple, setting: str | None) -> dict:
        from diffusion_dpo.demo.run import training_overrides
        from diffusion_dpo.evaluate import stats

        d = self.demo(seed)
        overrides = training_overrides(d.s, d.base, method, name, extra)
        measure = train_in_child(overrides, d.out / name, self.c.threads)
        if not self.c.report_only:  # (report_only: only finished runs get here, samples complete)
            d.sample(self._specs(d, [name]))
        judge, base = self.score(seed, name), self.score(seed, "base")
        row = {"loss": label, "setting": setting, "seed": seed, "run": name, "judge_mean": float(judge["judge"].mean()),
               "judge_base_mean": float(base["judge"].mean()), "fidelity_percent": 100 * float(judge["fidelity"].mean()),
               "win_vs_base": stats.win_rate(judge["judge"], base["judge"], 2000, seed=0),
               "fidelity_base_percent": 100 * float(base["fidelity"].mean()), **measure}
        row["fidelity_change"] = row["fidelity_percent"] - row["fidelity_base_percent"]
        if name != "dpo":
            row["win_vs_dpo"] = stats.win_rate(judge["judge"], self.score(seed, "dpo")["judge"], 2000, seed=0)
        return row

    def do(self, tasks: list[tuple[int, str, float | None]]) -> None:
        """Run `tasks` (seed, loss, value). A task another worker holds (several processes may run the same
        command on one --output-dir to share the work) is skipped and retried once that worker is done."""
        pending = list(tasks)
        while pending:
            left = []
            for seed, loss, value in pending:
                # the lock's path, not self.demo(seed): that would wait while another worker sets the seed up
                lock = Path(self.settings(seed).output_dir) / "logs" / f"{run_name(loss, value)}.lock"
                if not try_lock(lock):
                    left.append((seed, loss, value))
                    continue
                started = time.perf_counter()
                try:
                    row = self.run(seed, loss, value)
                finally:
                    lock.unlink(missing_ok=True)
                self.console.print(f"seed {seed} {row['run']}: judge win vs base "
                                   f"{100 * row['win_vs_base']['win_rate']:.1f}%, fidelity {row['fidelity_change']:+.1f}"
                                   f" pts, {row['seconds_per_step']:.3f} s/step, {row['peak_rss_mb']:.0f} MiB "
                                   f"({time.perf_counter() - started:.0f} s)")
            if left:
                time.sleep(10)
            pending = left

    def score(self, seed: int, name: str) -> dict:
        if (seed, name) not in self.scores:
            from diffusion_dpo.demo.run import demo_metrics
            from diffusion_dpo.evaluate import scoring

            samples = scoring.read_samples(self.demo(seed).out / "samples" / name)
            self.scores[seed, name] = {r.name: scoring.score_set(r, samples, batch_size=64) for r in demo_metrics()}
            self.scores[seed, name]["samples"] = samples
        return self.scores[seed, name]

    # ----------------------------------------------------------------------------------------------------
    def sweep_tasks(self) -> list[tuple[int, str, float]]:
        """Every loss's middle value first, then the others: a run cut short still has a seed-0 row for every
        loss."""
        losses = [x for x in self.c.losses if x in SWEEPS]
        n = max((len(sweep_values(self.c, x)) for x in losses), default=0)
        order = sorted(range(n), key=lambda i: (i != 1, i))
        return [(SWEEP_SEED, x, sweep_values(self.c, x)[i]) for i in order for x in losses
                if i < len(sweep_values(self.c, x))]

    def finished(self, task: tuple[int, str, float | None]) -> bool:
        """Trained to the full step count and sampled (what run() would redo nothing of)."""
        from diffusion_dpo.demo.world import heldout_prompts

        seed, loss, value = task
        s = self.settings(seed)
        folder, name = Path(s.output_dir), run_name(loss, value)
        summary, samples = folder / name / "train_summary.json", folder / "samples" / name / "samples.jsonl"
        if not ((folder / name / "measure.json").is_file() and summary.is_file() and samples.is_file()):
            return False
        # samples.jsonl is written before the images: each listed file must be there
        records = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        return (json.loads(summary.read_text()).get("steps") == s.train_steps
                and len(records) == len(heldout_prompts()[: s.eval_prompts]) * s.eval_images
                and all((samples.parent / r["file"]).is_file() for r in records))

    def ready(self, task: tuple[int, str, float | None]) -> bool:
        return not self.c.report_only or self.finished(task)

    def sweep(self) -> dict[str, dict]:
        """Each swept loss on SWEEP_SEED: every value's row and the chosen value (report_only: among the values
        finished so far, marked incomplete)."""
        out: dict[str, dict] = {}
        for task in self.sweep_tasks():
            entry = out.setdefault(task[1], {"key": SWEEPS[task[1]][0], "rows": [], "complete": True})
            if self.ready(task):
                entry["rows"].append(self.run(*task))
            else:
                entry["complete"] = False
        for entry in out.values():
            entry["rows"].sort(key=lambda r: float(r["setting"].split("=", 1)[1]))
            entry["chosen"] = choose(entry["rows"]) if entry["rows"] else None
        return out

    def compare(self) -> dict:
        import torch

        torch.set_num_threads(self.c.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # DPO (every seed's reference row, and the sweep seed's), the untuned losses, then the sweep, then the
        # tuned losses on every seed with the values the sweep chose
        dpo = [(seed, "dpo", None) for seed in dict.fromkeys([SWEEP_SEED, *self.c.seeds])]
        untuned = [(seed, x, None) for seed in self.c.seeds for x in self.c.losses if x != "dpo" and x not in SWEEPS]
        first = dpo + untuned + self.sweep_tasks()
        if not self.c.report_only:
            self.do(first)
        sweep = self.sweep()
        tasks = [(seed, x, sweep[x]["chosen"] if x in sweep else None) for seed in self.c.seeds for x in self.c.losses
                 if x not in sweep or sweep[x]["chosen"] is not None]
        if not self.c.report_only:
            self.do(tasks)
        rows = [self.run(*task) for task in tasks if self.ready(task)]  # done: read back
        missing = [f"seed{s}/{run_name(x, v)}" for s, x, v in dict.fromkeys(first + tasks) if not self.ready((s, x, v))]
        missing += [f"seed{s}/{x} (after its sweep)" for s in self.c.seeds if s != SWEEP_SEED for x in sweep
                    if sweep[x]["chosen"] is None]  # the sweep seed's row is one of the sweep's runs, listed above
        result = {"settings": {**asdict(self.c), "demo": asdict(demo_settings(self.c, self.c.seeds[0]))},
                  "sweep_seed": SWEEP_SEED, "fidelity_guard_points": FIDELITY_GUARD, "sweep": sweep, "rows": rows,
                  "missing": missing, "wall_seconds": round(time.perf_counter() - t0, 1)}
        result["settings"]["demo"].pop("seed"), result["settings"]["demo"].pop("output_dir")
        (self.out / "comparison.json").write_text(json.dumps(result, indent=1, default=float))
        from diffusion_dpo.demo.compare_table import markdown

        (self.out / "comparison.md").write_text(markdown(result))
        for seed in sorted({r["seed"] for r in rows}):
            self.write_grid(seed, [r["run"] for r in rows if r["seed"] == seed])
        self.console.print((self.out / "comparison.md").read_text())
        return result

    def write_grid(self, seed: int, runs: list[str]) -> Path:
        """Rows base / DPO / each loss's run (`runs`, DPO first), image 0 of the same held-out prompts."""
        sets = {n.split("-")[0]: self.score(seed, n)["samples"] for n in ["base", *runs]}
        return self.demo(seed).write_grid(sets, self.out / f"grid_seed{seed}.png")


def try_lock(path: Path) -> bool:
    """Claim `path` for this process (a file holding its pid): False while another live process holds it.
    A lock left by a process that died is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):  # just created, pid not written yet
            return False
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:  # its holder died: take it over
            path.unlink(missing_ok=True)
            return try_lock(path)
        except PermissionError:  # alive, another user's
            return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def choose(rows: list[dict]) -> float:
    """The swept value with the best judge win rate against the base (then the higher judge mean) among those
    within FIDELITY_GUARD points of the base's prompt fidelity; all of them if none is."""
    ok = [r for r in rows if r["fidelity_change"] >= -FIDELITY_GUARD] or rows
    best = max(ok, key=lambda r: (r["win_vs_base"]["win_rate"], r["judge_mean"]))
    return float(best["setting"].split("=", 1)[1])


def compare_losses(settings: CompareSettings, console: Any = None) -> dict:
    return Comparison(settings, console).compare()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
