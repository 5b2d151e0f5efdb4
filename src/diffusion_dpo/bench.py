"""`diffusion-dpo bench`: time training steps of our design against the official one, in one run.

Random-initialised models of real architectures (models/build.py) are saved once to a work folder
with a small synthetic Pick-a-Pic-style dataset and its prepared cache; then each variant runs in its
own child process (clean peak-memory numbers), warms up, and times several steps:

  a  ours, LoRA         the trainer's own step (Trainer.micro_step + backward + clip + optimizer) on cached
                        latents: no VAE, no text encoder, reference = the same UNet with adapters off
  b  ours, full         the same with full fine-tuning and a frozen reference copy
  c  official design    as the official Diffusion-DPO code does per step: decode both JPEGs, resize/crop,
                        VAE-encode both images, run the text encoder, full fine-tuning with a full frozen copy
  d  bare minimum       LoRA policy forward + backward and reference forward on precomputed tensors,
                        written as plainly as possible (the floor our step (a) is compared with)
  p  prepare vs step    what `prepare` costs per pair (diffusion_dpo.cache.prepare, after a warm-up), next to what
                        the cache saves per pair and pass over the data: the trainer's data path (loader +
                        Trainer.batch_encoder) on the raw images minus the same on the cache

Printed: the parameter counts of the saved networks, pairs/s, seconds per step, peak memory (child RSS on CPU,
max allocated on CUDA), FLOPs per step (counted with torch's FlopCounterMode), MFU on a GPU, the ratios a/c
and a/d, and prepare's cost per pair with the number of passes after which the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

VARIANTS = {
    "a": "ours: cached latents, LoRA",
    "b": "ours: cached latents, full + frozen copy",
    "c": "official: JPEG+VAE+text encoder per step, full + frozen copy",
    "d": "bare minimum: LoRA fwd+bwd + ref fwd",
    "p": "prepare once vs encode in every step",
}
DEFAULT_LATENT = {"tiny": 16, "mid": 32, "sd15": 64, "sdxl": 128}
"""Latent side per arch; the default resolution is this times the VAE's downsampling (tiny 32 px, mid 256 px,
sd15 512 px, sdxl 1024 px)."""
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16/fp16 tensor-core peak (SXM) per device; fp32 runs are reported against the TF32 peak (half)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="mid", choices=list(DEFAULT_LATENT),
                   help="model size: tiny (smoke test), mid (a 50M-parameter UNet), sd15, sdxl (real sizes, random "
                        "weights); the parameter counts are printed")
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
    p.add_argument("--variants", default="abcdp", help="which variants to run, e.g. 'ac' (default abcdp)")
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


# ----------------------------------------------------------------------------------------------
# Parent: shared artefacts, one child per variant, summary


def run(args: argparse.Namespace) -> int:
    from diffusion_dpo.errors import ConfigError

    bad = set(args.variants) - set(VARIANTS)
    if bad or not args.variants:
        raise ConfigError(f"--variants: unknown {''.join(sorted(bad))!r}; use letters from 'abcdp'")
    for flag, value in (("--pairs", args.pairs), ("--steps", args.steps), ("--repeat", args.repeat),
                        ("--prepare-batch-size", args.prepare_batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    from diffusion_dpo.models.build import vae_downsampling

    vae = args.arch if args.vae == "arch" else args.vae
    res = args.resolution or DEFAULT_LATENT[args.arch] * vae_downsampling(vae)  # same latent size for every VAE
    family = "sdxl" if args.arch == "sdxl" else "sd"
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model, parquet, cache = _setup(work, args.arch, family, res, args.pairs, args.seed, vae)
        print(f"bench: arch {args.arch} ({family}), VAE {vae}, {res} px, {args.pairs} pairs/step, {args.warmup} warm-up + "
              f"{args.steps} timed steps per variant; set-up {time.perf_counter() - t0:.0f} s", flush=True)
        params = parameter_counts(model)
        print("parameters (counted on the models): " + ", ".join(f"{name} {_count(n)}" for name, n in params.items()),
              flush=True)
        results: dict[str, dict] = {}
        for rep, v in [(rep, v) for rep in range(args.repeat) for v in args.variants]:
            job = {"variant": v, "model": str(model), "parquet": str(parquet), "cache": str(cache), "family": family,
                   "resolution": res, "pairs": args.pairs, "steps": args.steps, "warmup": args.warmup,
                   "lora_rank": args.lora_rank, "mixed_precision": args.mixed_precision, "seed": args.seed,
                   "channels_last": args.channels_last, "compile": args.compile, "fused_adamw": args.fused_adamw,
                   "lean_autograd": args.lean_autograd, "gradient_checkpointing": args.gradient_checkpointing,
                   "threads": args.threads, "out": str(work / f"out_{v}"),
                   "prepare_batch_size": args.prepare_batch_size}
            r = _run_child(job)
            print(_row(v, r) + (f"  [round {rep + 1}]" if args.repeat > 1 else ""), flush=True)
            if v == "p":
                results[v] = _least_disturbed_prepare(results.get(v), r)
            elif v not in results or r["s_per_step"] < results[v]["s_per_step"]:
                results[v] = r
        if args.repeat > 1:
            print("kept per variant (lowest median of the rounds; p: the lowest of each cost):")
            for v in args.variants:
                print(_row(v, results[v]))
    summary = _summary(results, args.arch, res, args.pairs)
    print(summary["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "parameters": params, "results": results,
                                               "ratios": summary["ratios"]}, indent=1, default=str))
    return 0


def parameter_counts(model: Path) -> dict[str, int]:
    """Parameters of each network of a saved pipeline, counted on the model objects (the real classes built
    from the saved configs on the meta device: no weights are read or allocated)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    nets: dict[str, Any] = {}
    with init_empty_weights():
        for name, cls in (("UNet", UNet2DConditionModel), ("VAE", AutoencoderKL)):
            nets[name] = cls.from_config(cls.load_config(model, subfolder=name.lower()))
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (model / name).is_dir():
                nets[name.replace("_", " ")] = cls(CLIPTextConfig.from_pretrained(model / name))
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _setup(work: Path, arch: str, family: str, res: int, pairs: int, seed: int,
           vae: str | None = None) -> tuple[Path, Path, Path]:
    """Random-init pipeline folder, a synthetic dataset (JPEGs a bit larger than `res`) and its cache."""
    from diffusion_dpo.cache.prepare import prepare_cache
    from diffusion_dpo.config import load_config
    from diffusion_dpo.data.synthetic import write_pickapic_parquet
    from diffusion_dpo.models.build import build_pipeline

    words = ["a", "photo", "of", "small", "large", "red", "green", "blue", "circle", "square"]
    vae = vae or arch
    model = work / f"model-{arch}-{family}-{res}-vae-{vae}"
    if not (model / "model_index.json").is_file():
        pipe = build_pipeline(family, arch, resolution=res, words=words, seed=seed, vae=vae)
        pipe.save_pretrained(model, safe_serialization=True)
    parquet = work / f"pairs-{res}.parquet"
    if not parquet.is_file():
        write_pickapic_parquet(parquet, n=max(8, 4 * pairs), seed=seed, size=(res * 9 // 8, res * 5 // 4))
    cfg = load_config(None, [f"model.pretrained={model}", f"data.source={parquet}", f"data.resolution={res}",
                             f"data.cache_dir={work / 'cache'}"])
    cache = prepare_cache(cfg, progress=False)
    return model, parquet, cache


def _run_child(job: dict) -> dict:
    env = dict(os.environ)
    if job["threads"]:
        env["OMP_NUM_THREADS"] = str(job["threads"])
    proc = subprocess.run([sys.executable, "-c", "import sys; from diffusion_dpo.bench import child_main; "
                           "sys.exit(child_main(sys.argv[1]))", json.dumps(job)],
                          env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"bench variant {job['variant']} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def _row(v: str, r: dict) -> str:
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


def _summary(results: dict, arch: str, res: int, pairs: int) -> dict:
    ratios: dict[str, float] = {}
    if "a" in results and "c" in results:
        ratios["a/c pairs/s"] = results["a"]["pairs_per_s"] / results["c"]["pairs_per_s"]
    if "a" in results and "d" in results:
        ratios["a/d pairs/s"] = results["a"]["pairs_per_s"] / results["d"]["pairs_per_s"]
    if "a" in results and "b" in results:
        a, b = results["a"], results["b"]
        ratios["a/b peak memory"] = a["peak_mem_mb"] / b["peak_mem_mb"]
        if a["device"] == "cpu":
            ratios["a/b peak memory above imports"] = (a["peak_mem_mb"] - a["base_rss_mb"]) / (b["peak_mem_mb"] - b["base_rss_mb"])
    device = next(iter(results.values()))["device_name"]
    lines = [f"device: {device}; arch {arch}, {res} px, {pairs} pairs/step"]
    lines += [f"  {k}: {v:.2f}" for k, v in ratios.items()]
    if "p" in results:
        p = results["p"]
        saved = p["instep_s_per_pair"] - p["cached_s_per_pair"]
        ratios["prepare / in-step encoding per pair"] = p["prepare_s_per_pair"] / p["instep_s_per_pair"]
        lines.append(f"  prepare / in-step encoding per pair: {ratios['prepare / in-step encoding per pair']:.2f} "
                     f"({p['prepare_s_per_pair']:.3f} / {p['instep_s_per_pair']:.3f} s)")
        if saved > 0:
            ratios["break-even passes"] = p["prepare_s_per_pair"] / saved
            lines.append(f"  break-even passes: {ratios['break-even passes']:.2f} (prepare "
                         f"{p['prepare_s_per_pair']:.3f} s/pair / {saved:.3f} s/pair saved per pass: the cache pays "
                         "from then on)")
        else:
            lines.append("  break-even passes: never (reading the cache cost as much as encoding in the step)")
    return {"ratios": ratios, "text": "\n".join(lines)}


def _least_disturbed_prepare(old: dict | None, new: dict) -> dict:
    """p over several rounds: each cost from the round where it was lowest (the least disturbed)."""
    if old is None:
        return new
    best = dict(old if old["prepare_s_per_pair"] <= new["prepare_s_per_pair"] else new)
    for key in ("instep_s_per_pair", "cached_s_per_pair"):
        best[key] = min(old[key], new[key])
    return best


# ----------------------------------------------------------------------------------------------
# Child: one variant, timed


def child_main(job_json: str) -> int:
    import torch

    job = json.loads(job_json)
    base_rss = _rss_mb("VmRSS")  # after importing torch, before any model
    torch.manual_seed(job["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if job["variant"] == "p":
        print("BENCH_RESULT " + json.dumps(_prepare_cost(job, device)), flush=True)
        return 0
    step = {"a": _ours, "b": _ours, "c": _official, "d": _bare}[job["variant"]](job, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(job["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(job["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    hw_flops = flops = _count_flops(step)  # what ran, recomputation included
    if job.get("gradient_checkpointing"):  # model FLOPs: the same step without recomputation
        step.unet.disable_gradient_checkpointing()
        flops = _count_flops(step)
        step.unet.enable_gradient_checkpointing()
    mean = sum(times) / len(times)
    median = sorted(times)[len(times) // 2]
    name = _device_name(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb("VmHWM")
    mfu = None
    if device.type == "cuda":
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak_tflops is not None:
            if job["mixed_precision"] == "no":
                peak_tflops /= 2  # TF32 tensor-core peak
            mfu = flops / mean / (peak_tflops * 1e12)
    # pairs/s from the median step: robust to a step slowed by another process on a shared machine
    result = {"s_per_step": median, "s_mean": mean, "s_min": min(times), "s_all": times,
              "pairs_per_s": job["pairs"] / median, "peak_mem_mb": peak, "base_rss_mb": base_rss, "device": device.type, "device_name": name, "gflop_per_step": flops / 1e9,
              "hw_gflop_per_step": hw_flops / 1e9, "gflops_per_s": flops / mean / 1e9, "mfu": mfu,
              "hfu": None if mfu is None else mfu * hw_flops / flops}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def _prepare_cost(job: dict, device) -> dict:
    """(p): `prepare`'s cost per pair, and the trainer's data path per pair on the raw images and on the cache."""
    import shutil

    from diffusion_dpo.cache.prepare import Distribution, PrepareTimes, default_batch_size, prepare_cache
    from diffusion_dpo.config import load_config

    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)  # a fresh cache every round
    data = [f"model.pretrained={job['model']}", f"data.source={job['parquet']}", f"data.resolution={job['resolution']}"]
    dist = Distribution(device=device)
    batch = job.get("prepare_batch_size") or default_batch_size(device)
    # untimed warm-up on one batch: a process's first encoder calls pay one-off set-up (allocations, kernels)
    prepare_cache(load_config(None, [*data, f"data.max_pairs={batch}"]), cache_dir=str(out / "warmup"),
                  batch_size=batch, dist=dist, progress=False)
    times = PrepareTimes()
    prepare_cache(load_config(None, data), cache_dir=str(out / "timed"), batch_size=batch, dist=dist, progress=False,
                  times=times)
    return {"device": device.type, "device_name": _device_name(device), "prepare_batch_size": batch,
            "prepare_s_per_pair": times.median_per_pair(), "prepare_parts": times.per_pair(),
            "instep_s_per_pair": _data_path_s_per_pair(job, job["parquet"], out / "fly"),
            "cached_s_per_pair": _data_path_s_per_pair(job, job["cache"], out / "cached"),
            "steps": job["steps"], "pairs": job["pairs"]}


def _data_path_s_per_pair(job: dict, source: str, out: Path) -> float:
    """Median seconds per pair of what the trainer does before the UNet: the next batch from its loader
    (decoding + transforms, or reading the cache) and Trainer.batch_encoder (the VAE and text encoder on the fly)."""
    import gc

    import torch

    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import Trainer

    cfg = load_config(None, [f"model.pretrained={job['model']}", f"data.source={source}",
                             f"data.resolution={job['resolution']}", f"train.batch_size={job['pairs']}",
                             "train.max_steps=100000", "train.checkpoint_every=0", f"train.seed={job['seed']}",
                             "output.report_to=none", f"output.dir={out}"])
    tr = Trainer(cfg).setup()
    batches = iter(tr.loader)
    times = []
    for i in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        batch = tr.batch_encoder(next(batches))
        if batch.noise.is_cuda:
            torch.cuda.synchronize()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    del tr, batches
    gc.collect()
    return sorted(times)[len(times) // 2] / job["pairs"]


def _rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MiB. Not getrusage's ru_maxrss: Linux carries it over
    from the parent across fork + exec, so a child would report at least the parent's size."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB (macOS: bytes)


def _count_flops(step: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _tweak_unet(unet, job: dict):
    import torch

    if job["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    if job["compile"]:
        unet.compile()  # in place: the module keeps its attributes (adapters, config)
    return unet


def _ours(job: dict, device) -> Callable[[], None]:
    """(a) / (b): the trainer's own set-up and inner loop body (train/trainer.py), on the prepared cache."""
    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import Trainer

    finetune = "lora" if job["variant"] == "a" else "full"
    cfg = load_config(None, [f"model.pretrained={job['model']}", f"data.source={job['cache']}",
                             f"data.resolution={job['resolution']}", f"train.batch_size={job['pairs']}",
                             f"train.finetune={finetune}", f"lora.rank={job['lora_rank']}", "train.max_steps=100000",
                             "train.checkpoint_every=0", f"train.mixed_precision='{job['mixed_precision']}'",
                             f"train.lean_autograd={str(job.get('lean_autograd', True)).lower()}",
                             f"train.gradient_checkpointing={str(job.get('gradient_checkpointing', False)).lower()}",
                             f"train.seed={job['seed']}", "output.report_to=none", f"output.dir={job['out']}"])
    tr = Trainer(cfg).setup()
    _tweak_unet(tr.accelerator.unwrap_model(tr.unet), job)
    if job["fused_adamw"]:
        tr.optimizer.optimizer.param_groups[0]["fused"] = True
        tr.optimizer.optimizer.defaults["fused"] = True
    acc = tr.accelerator
    batches = iter(tr.loader)

    def step():
        raw = next(batches)
        loss, metrics, _ = tr.micro_step(raw)
        acc.backward(loss)
        acc.clip_grad_norm_(tr.params, cfg.train.max_grad_norm)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
        {k: v.item() for k, v in metrics.items()}  # the trainer logs every step

    step.unet = acc.unwrap_model(tr.unet)
    return step


def _official(job: dict, device) -> Callable[[], None]:
    """(c): the per-step work of the official Diffusion-DPO training script, written out as it does it."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path, res, b, sdxl = job["model"], job["resolution"], job["pairs"], job["family"] == "sdxl"
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).requires_grad_(False)
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device).requires_grad_(False)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").to(device)
                        .requires_grad_(False))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)
    ref_unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).requires_grad_(False)
    unet.train()
    if job.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8, weight_decay=1e-2)
    rows = pq.read_table(job["parquet"]).to_pylist()
    beta, position = 2000.0, [0]

    def to_pixels(jpeg: bytes) -> torch.Tensor:  # Resize(res) + CenterCrop(res) + ToTensor + Normalize([.5], [.5])
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        scale = res / min(img.size)
        img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        arr = np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5

    def encode_text(captions: list[str]):
        hidden, pooled = [], None
        for tok, enc in zip(tokenizers, encoders):
            ids = tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids.to(device)
            if sdxl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out.text_embeds if "text_embeds" in out else pooled
            else:
                hidden.append(enc(ids)[0])
        return torch.cat(hidden, dim=-1), pooled

    def step():
        batch = [rows[(position[0] + i) % len(rows)] for i in range(b)]
        position[0] += b
        # the official collate: winner and loser concatenated on the channel axis, label decides the order
        pixel_values = torch.stack([torch.cat([to_pixels(r["jpg_0"]), to_pixels(r["jpg_1"])] if r["label_0"] == 1
                                              else [to_pixels(r["jpg_1"]), to_pixels(r["jpg_0"])]) for r in batch])
        feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1)).to(device)  # (2B, 3, R, R)
        with torch.no_grad():
            latents = vae.encode(feed_pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=device).long().repeat(2)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            encoder_hidden_states, pooled = encode_text([r["caption"] for r in batch])
        encoder_hidden_states = encoder_hidden_states.repeat(2, 1, 1)
        added = None
        if sdxl:  # the official constant time ids (res, res, 0, 0, res, res)
            time_ids = torch.tensor([res, res, 0, 0, res, res], device=device, dtype=torch.float32).repeat(2 * b, 1)
            added = {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids}
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added).sample
        model_losses = (model_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        with torch.no_grad():
            ref_pred = ref_unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added).sample.detach()
            ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        inside_term = -0.5 * beta * (model_diff - ref_diff)
        loss = -1 * F.logsigmoid(inside_term).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    step.unet = unet
    return step


def _bare(job: dict, device) -> Callable[[], None]:
    """(d): the least work a LoRA DPO step can do: tensors ready on the device, one reference forward with
    adapters off, one policy forward + backward, an optimizer step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from diffusion_dpo.models.lora import add_lora

    path, b = job["model"], job["pairs"]
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)
    add_lora(unet, job["lora_rank"], None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    if job.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    _tweak_unet(unet, job)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=job["fused_adamw"] or None)
    shard = load_file(str(sorted(Path(job["cache"]).glob("shard-*.safetensors"))[0]))
    latents = torch.cat([shard["latent_mean"][:b, 0, 0], shard["latent_mean"][:b, 0, 1]]).float().to(device)  # (2B,...)
    emb = shard["prompt_embeds"][:b].float().repeat(2, 1, 1).to(device)
    noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (b,), device=device).repeat(2)
    noisy = scheduler.add_noise(latents, noise, t)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if job["mixed_precision"] == "bf16" else torch.float16,
                              enabled=job["mixed_precision"] != "no")

    def step():
        with autocast:
            with torch.no_grad():
                unet.disable_adapters()
                ref = unet(noisy, t, emb).sample
                unet.enable_adapters()
            pred = unet(noisy, t, emb).sample
        err = (pred.float() - noise).pow(2).mean(dim=[1, 2, 3])
        err_ref = (ref.float() - noise).pow(2).mean(dim=[1, 2, 3])
        loss = -F.logsigmoid(-0.5 * 2000.0 * ((err[:b] - err[b:]) - (err_ref[:b] - err_ref[b:]))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    step.unet = unet
    return step
