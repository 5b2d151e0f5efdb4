"""`diffusion-dpo evaluate`: score sampled images with reward models and compare models to a baseline.

Score existing samples (folders written by `diffusion-dpo sample`):
    diffusion-dpo evaluate --samples samples/ --baseline base --metrics pickscore,hpsv21,aesthetic --out report/
Or sample first (base and each tuned model, same seeds; resumable), then score:
    diffusion-dpo evaluate --base sd15/ --tuned dpo=out/lora --prompts partiprompts --out report/ --preset paper
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffusion_dpo.commands.common import add_sampling_arguments

DEFAULT_METRICS = "pickscore,pickscore_cosine,hpsv21,aesthetic,clip"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="report folder: results.json, results.md, report.html, scores.jsonl")
    parser.add_argument("--samples", default=None,
                        help="folder holding one subfolder per model (from `diffusion-dpo sample`); default OUT/samples")
    parser.add_argument("--models", default=None, help="comma-separated model subfolders to compare (default: all)")
    parser.add_argument("--baseline", default=None, help="model the others are compared with (default: 'base' "
                        "if present, else the first model)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS,
                        help="comma-separated metrics: names (pickscore, pickscore_cosine, hpsv2, hpsv21, aesthetic, "
                             "clip, text_alignment, imagereward), name=SOURCE (local folder/file or hub id) or "
                             f"module:function (default {DEFAULT_METRICS})")
    parser.add_argument("--metric-option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                        help="scorer option, e.g. aesthetic.clip=/models/clip-l14, clip.scale=1, "
                             "text_alignment.captioner=/models/llava (repeatable; VALUE parsed as JSON if it can be)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for win-rate intervals")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="images per reward-model call")
    parser.add_argument("--device", default="cpu", help="torch device for sampling and scoring")
    parser.add_argument("--html-max-prompts", type=int, default=200, help="prompts shown in report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    g = parser.add_argument_group("sampling first (optional)")
    g.add_argument("--base", default=None, help="base pipeline folder or hub id: sample it (as 'base') and every "
                   "--tuned model into --samples before scoring")
    g.add_argument("--tuned", action="append", default=[], metavar="NAME=DIR",
                   help="a tuned model: a LoRA folder or a UNet folder (repeatable)")
    add_sampling_arguments(parser, required=False)
    g = parser.add_argument_group("implicit-reward accuracy (Diffusion-DPO Table 2; needs --base and --tuned)")
    g.add_argument("--pairs", default=None, help="held-out preference pairs: a manifest (.jsonl/.csv of prompt, "
                   "chosen, rejected), folder pairs or Pick-a-Pic parquet, as `train` reads them")
    g.add_argument("--implicit-timesteps", type=int, default=8, help="fixed timesteps averaged per pair")
    g.add_argument("--implicit-beta", type=float, default=5000.0, help="beta of the reported mean logit "
                   "(the accuracy does not depend on it)")
    g.add_argument("--implicit-max-pairs", type=int, default=None, help="use at most this many pairs")
    g.add_argument("--implicit-vae", default=None, help="a separate VAE (hub id or folder) to encode the pairs, as "
                   "model.vae in training; it always runs in float32, whatever --dtype")


def _parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    from diffusion_dpo.errors import ConfigError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        metric, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ConfigError(f"--metric-option {item!r}: expected METRIC.KEY=VALUE, e.g. clip.scale=1")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(metric.strip().lower(), {})[option.strip()] = parsed
    return out


def _tuned_model(item: str, base: str):
    """--tuned NAME=DIR -> the SampledModel it names (a LoRA or a UNet folder, told apart by its files)."""
    from diffusion_dpo.errors import ConfigError
    from diffusion_dpo.evaluate.sampling import tuned_model

    name, sep, folder = item.partition("=")
    if not sep:
        raise ConfigError(f"--tuned {item!r}: expected NAME=DIR (a LoRA folder or a UNet folder)")
    return tuned_model(name, base, folder)


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.errors import ConfigError
    from diffusion_dpo.evaluate import scoring
    from diffusion_dpo.evaluate.report import run_summary, write_report
    from diffusion_dpo.runtime import setup_logging

    setup_logging()

    samples_dir = Path(args.samples or Path(args.out) / "samples")
    options = _parse_options(args.metric_option)
    metric_specs = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metric_specs:
        raise ConfigError("--metrics is empty; name at least one metric")

    # 1. sample first, if asked (resumable: finished images are skipped); --pairs alone samples nothing
    if args.base and (args.prompts or not args.pairs):
        from diffusion_dpo.commands.common import check_counts, sampling_overrides
        from diffusion_dpo.evaluate.prompts import load_prompts
        from diffusion_dpo.evaluate.sampling import SampledModel, sample_model

        if not args.prompts:
            raise ConfigError("--base needs --prompts (a built-in prompt set or a local file)")
        check_counts(args)
        prompts = load_prompts(args.prompts, cache_dir=args.prompt_cache).limit(args.limit)
        models = [SampledModel("base", args.base)] + [_tuned_model(t, args.base) for t in args.tuned]
        for model in models:
            r = sample_model(model, prompts, samples_dir, preset=args.preset, images_per_prompt=args.images_per_prompt,
                             seed=args.seed, batch_size=args.sample_batch_size, device=args.device, dtype=args.dtype,
                             progress=not args.quiet, **sampling_overrides(args))
            print(f"{model.name}: {r.generated} images generated, {r.skipped} already on disk")
    elif args.tuned and not args.base:
        raise ConfigError("--tuned needs --base (the pipeline the LoRA or UNet applies to)")

    # 2. implicit-reward accuracy of each tuned model against the base, if asked
    implicit: dict[str, dict] = {}
    if args.pairs:
        from diffusion_dpo.evaluate.implicit import implicit_accuracy

        if not (args.base and args.tuned):
            raise ConfigError("--pairs needs --base and at least one --tuned NAME=DIR")
        for item in args.tuned:
            model = _tuned_model(item, args.base)
            implicit[model.name] = implicit_accuracy(
                args.base, args.pairs, lora=model.lora, unet=model.unet, num_timesteps=args.implicit_timesteps,
                beta=args.implicit_beta, max_pairs=args.implicit_max_pairs, device=args.device, dtype=args.dtype,
                seed=args.seed, vae=args.implicit_vae)
            print(f"{model.name}: implicit-reward accuracy {100 * implicit[model.name]['accuracy']:.1f}% "
                  f"on {implicit[model.name]['pairs']} pairs")
        if not args.prompts and not (samples_dir.is_dir() and any(samples_dir.glob("*/samples.jsonl"))):
            from diffusion_dpo.evaluate.report import write_implicit_only

            paths = write_implicit_only(args.out, implicit)
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
            return 0

    # 3. read the sample folders and check they are comparable
    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    sets = scoring.read_sample_sets(samples_dir, names)
    baseline = args.baseline or ("base" if "base" in sets else next(iter(sets)))
    if baseline not in sets:
        raise ConfigError(f"--baseline {baseline!r} is not among the models: {', '.join(sets)}")
    scoring.check_comparable(list(sets.values()))

    # 4. score every model with every metric, one reward model in memory at a time
    scores, infos = scoring.score_models(metric_specs, sets, options, device=args.device, batch_size=args.batch_size,
                                         verbose=not args.quiet)

    # 5. compare, write the report, print the table
    entries = scoring.compare(scores, sets, infos, baseline, resamples=args.bootstrap, seed=args.bootstrap_seed)
    summary = run_summary(sets, baseline, args.bootstrap, args.bootstrap_seed, implicit)
    paths = write_report(args.out, entries, infos, scores, sets, baseline, summary, args.html_max_prompts)
    print(paths["markdown"].read_text().split("\n## Metrics")[0])
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
