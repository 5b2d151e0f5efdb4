"""`diffusion-dpo bench`: time training steps of our design against the official one, in one run.

Flags and printing only; the benchmark itself is the library package diffusion_dpo.bench (its docstring lists
the variants a to f and p; docs/performance.md has the figures)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from diffusion_dpo.bench import VARIANTS
from diffusion_dpo.models.build import ARCH_LATENT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="mid", choices=list(ARCH_LATENT),
                   help="model size: tiny (smoke test), mid (a 50M-parameter UNet), sd15, sdxl (real sizes, random "
                        "weights), sd35m, sd35l, flux (the real transformers, random weights, with small stand-in "
                        "text encoders and VAE of the real output shapes: the timed step runs on the prepared cache; "
                        "variants a, b, e, f only); the parameter counts are printed")
    p.add_argument("--resolution", type=int,
                   help="image size in pixels (default: the arch's latent size x the VAE's downsampling: tiny 32, "
                        "mid 256, sd15 512, sdxl 1024)")
    p.add_argument("--vae", default="arch", choices=["arch", "small", "sd"],
                   help="'arch': the VAE models.build pairs with the arch (tiny: a small 2x-downsampling test VAE; mid: "
                        "SD's VAE layout at 11/32 width, which costs the same share of a UNet forward as SD 1.5's; "
                        "sd15/sdxl: SD's VAE); 'small': the 2x test VAE; 'sd': SD's full VAE")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant (default 2)")
    p.add_argument("--variants",
                   help="which variants to run, e.g. 'ace' (default abcdefp; e: cached reference, f: no reference; "
                        "sd35m, sd35l, flux: default aef, and c, d, p are refused: they time UNet pipelines)")
    p.add_argument("--prepare-batch-size", type=int,
                   help="p: pairs per encoder call of `prepare` (default: prepare's own default for the device)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the variants N times, interleaved (a b c d a b c d ...), and keep each variant's least "
                        "disturbed run (lowest median): for shared machines (default 1)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                   help="autocast for a, b, d (c keeps the official fp32 / weight_dtype behaviour)")
    p.add_argument("--channels-last", action="store_true", help="a, b, d: UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="a, b, d: torch.compile the UNet")
    p.add_argument("--fused-adamw", action="store_true", help="a, b, d: AdamW(fused=True) (also on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="all variants: recompute each UNet block in backward (the official script's "
                        "--gradient_checkpointing too). MFU then counts model FLOPs (no recomputation); the recomputed "
                        "FLOPs are reported as hardware FLOPs")
    p.add_argument("--no-lean-autograd", dest="lean_autograd", action="store_false",
                   help="a, b: train.lean_autograd=false (autograd keeps frozen convolutions' inputs, GEGLU's GELU, "
                        "the norm outputs under SiLUs and LoRA down-projections; same gradients, more memory)")
    p.add_argument("--threads", type=int, help="torch threads per child (default: torch's default)")
    p.add_argument("--workdir", help="keep the saved models, data and cache here (default: a temp folder)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shrink", action="store_true", help=argparse.SUPPRESS)  # tests: a 1-layer flow transformer


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.bench.runner import least_disturbed, parameter_counts, ratios, run_child, setup_work
    from diffusion_dpo.errors import ConfigError
    from diffusion_dpo.models.build import FLOW_ARCHS, arch_family, vae_downsampling
    from diffusion_dpo.runtime import setup_logging

    flow = args.arch in FLOW_ARCHS
    if args.variants is None:
        args.variants = "aef" if flow else "abcdefp"
    bad = set(args.variants) - set(VARIANTS)
    if bad or not args.variants:
        raise ConfigError(f"--variants: unknown {''.join(sorted(bad))!r}; use letters from 'abcdefp'")
    for flag, value in (("--pairs", args.pairs), ("--steps", args.steps), ("--repeat", args.repeat),
                        ("--prepare-batch-size", args.prepare_batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if flow and set(args.variants) & set("cdp"):
        raise ConfigError(f"--variants: c, d and p time UNet pipelines (the official SD script, the bare UNet step, "
                          f"prepare with the real encoders); for --arch {args.arch} use letters from 'abef'")
    if flow and args.vae != "arch":
        raise ConfigError(f"--vae {args.vae}: --arch {args.arch} has its own 16-channel stand-in VAE; drop --vae")
    if args.shrink and not flow:
        raise ConfigError("--shrink reduces a flow transformer (--arch sd35m, sd35l, flux); drop it")
    setup_logging()
    vae = args.arch if args.vae == "arch" else args.vae
    res = args.resolution or ARCH_LATENT[args.arch] * vae_downsampling(vae)  # same latent size for every VAE
    family = arch_family(args.arch)
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model, parquet, cache = setup_work(work, args.arch, family, res, args.pairs, args.seed, vae, args.shrink)
        print(f"bench: arch {args.arch}{' (shrunk: 1 layer, 2 heads)' if args.shrink else ''} ({family}), VAE {vae}, "
              f"{res} px, {args.pairs} pairs/step, {args.warmup} warm-up + {args.steps} timed steps per variant; set-up "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if flow:
            print("note: the transformer is the real architecture; the text encoders and the VAE are small stand-ins "
                  "with the real output shapes (T5 states 4096 wide, pooled CLIP widths, 16 latent channels), which "
                  "only fill the cache: the timed step does not run them", flush=True)
        params = parameter_counts(model)
        print("parameters (counted on the models): " + ", ".join(f"{name} {_count(n)}" for name, n in params.items()),
              flush=True)
        results: dict[str, dict] = {}
        for rep, v in [(rep, v) for rep in range(args.repeat) for v in args.variants]:
            job = {"variant": v, "model": str(model), "parquet": str(parquet), "cache": str(cache),
                   "resolution": res, "pairs": args.pairs, "steps": args.steps, "warmup": args.warmup,
                   "lora_rank": args.lora_rank, "mixed_precision": args.mixed_precision, "seed": args.seed,
                   "channels_last": args.channels_last, "compile": args.compile, "fused_adamw": args.fused_adamw,
                   "lean_autograd": args.lean_autograd, "gradient_checkpointing": args.gradient_checkpointing,
                   "threads": args.threads, "out": str(work / f"out_{v}"),
                   "prepare_batch_size": args.prepare_batch_size}
            r = run_child(job)
            print(_row(v, r) + (f"  [round {rep + 1}]" if args.repeat > 1 else ""), flush=True)
            results[v] = least_disturbed(v, results.get(v), r)
        if args.repeat > 1:
            print("kept per variant (lowest median of the rounds; p: the lowest of each cost):")
            for v in args.variants:
                print(_row(v, results[v]))
    found = ratios(results)
    print(_summary(results, found, args.arch, res, args.pairs))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "parameters": params, "results": results,
                                               "ratios": found}, indent=1, default=str))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _row(v: str, r: dict) -> str:
    """One variant's printed line."""
    if v == "p":
        parts = r["prepare_parts"]
        return (f"  (p) {VARIANTS[v]:<60} prepare {r['prepare_s_per_pair']:.3f} s/pair (median batch of "
                f"{r['prepare_batch_size']}; means: images {parts['images']:.3f}, VAE {parts['vae']:.3f}, text "
                f"{parts['text']:.3f}, write {parts['write']:.3f}); in the step: {r['instep_s_per_pair']:.3f} "
                f"s/pair on the fly, {r['cached_s_per_pair']:.4f} from the cache (median of {r['steps']} steps of "
                f"{r['pairs']} pairs)")
    if r["device"] == "cpu":
        mem = f"{r['peak_mem_mb']:.0f} MB RSS ({r['peak_mem_mb'] - r['base_rss_mb']:.0f} above imports)"
    else:
        mem = f"{r['peak_mem_mb']:.0f} MB max allocated"
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    if r.get("hw_gflop_per_step") and r["hw_gflop_per_step"] != r["gflop_per_step"]:
        hfu = f", HFU {100 * r['hfu']:.1f}%" if r.get("hfu") is not None else ""
        mfu += f"; {r['hw_gflop_per_step']:.1f} GFLOP/step run with recomputation{hfu}"
    return (f"  ({v}) {VARIANTS[v]:<60} {r['pairs_per_s']:7.2f} pairs/s  {r['s_per_step']:.3f} s/step "
            f"(median; mean {r['s_mean']:.3f}, min {r['s_min']:.3f})  peak {mem}  {r['gflop_per_step']:.1f} GFLOP/step "
            f"({r['gflops_per_s']:.1f} GFLOP/s{mfu})")


def _summary(results: dict, found: dict[str, float], arch: str, res: int, pairs: int) -> str:
    """The closing lines: the device, the ratios, and prepare's cost with its break-even passes."""
    device = next(iter(results.values()))["device_name"]
    lines = [f"device: {device}; arch {arch}, {res} px, {pairs} pairs/step"]
    lines += [f"  {k}: {v:.2f}" for k, v in found.items() if k.startswith(("a/c", "a/d", "a/b", "e/", "f/"))]
    if "p" in results:
        p = results["p"]
        lines.append(f"  prepare / in-step encoding per pair: {found['prepare / in-step encoding per pair']:.2f} "
                     f"({p['prepare_s_per_pair']:.3f} / {p['instep_s_per_pair']:.3f} s)")
        if "break-even passes" in found:
            saved = p["instep_s_per_pair"] - p["cached_s_per_pair"]
            lines.append(f"  break-even passes: {found['break-even passes']:.2f} (prepare "
                         f"{p['prepare_s_per_pair']:.3f} s/pair / {saved:.3f} s/pair saved per pass: the cache pays "
                         "from then on)")
        else:
            lines.append("  break-even passes: never (reading the cache cost as much as encoding in the step)")
    return "\n".join(lines)
