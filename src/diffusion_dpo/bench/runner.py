"""The parent side of the benchmark: the shared artefacts, one child process per variant, the ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from diffusion_dpo.bench.child import RESULT_PREFIX

WORDS = ["a", "photo", "of", "small", "large", "red", "green", "blue", "circle", "square"]
"""The vocabulary of the synthetic captions (whole-word tokens of the built tokenizer)."""


def setup_work(work: Path, arch: str, family: str, res: int, pairs: int, seed: int,
               vae: str | None = None, shrink: bool = False) -> tuple[Path, Path, Path]:
    """Random-init pipeline folder, a synthetic dataset (JPEGs a bit larger than `res`) and its cache, each
    made once per work folder (`family`: models.build.arch_family(arch)). The flow archs (models.build.FLOW_ARCHS)
    get build_real_flow_pipeline's real transformer with stand-in encoders (`shrink`: its test-only reduced
    transformer)."""
    from diffusion_dpo.cache.prepare import prepare_cache
    from diffusion_dpo.config import load_config
    from diffusion_dpo.data.synthetic import write_pickapic_parquet
    from diffusion_dpo.models.build import FLOW_ARCHS, build_pipeline, build_real_flow_pipeline

    vae = vae or arch
    model = work / f"model-{arch}{'-shrunk' if shrink else ''}-{family}-{res}-vae-{vae}"
    if not (model / "model_index.json").is_file():
        if arch in FLOW_ARCHS:
            import torch

            # built on the GPU when there is one (random init of Flux's 11.9B parameters is slow on a CPU) and saved
            # in bf16 as the published SD3.5 / Flux checkpoints are (Flux: 24 GB on disk, not 48); the trainer loads
            # it in float32 as it loads those
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                pipe = build_real_flow_pipeline(arch, resolution=res, words=WORDS, seed=seed, shrink=shrink)
            pipe.transformer.to(torch.bfloat16)
        else:
            pipe = build_pipeline(family, arch, resolution=res, words=WORDS, seed=seed, vae=vae)
        pipe.save_pretrained(model, safe_serialization=True)
        del pipe  # the children need the device's memory
        if arch in FLOW_ARCHS:
            torch.cuda.empty_cache()
    parquet = work / f"pairs-{res}.parquet"
    if not parquet.is_file():
        write_pickapic_parquet(parquet, n=max(8, 4 * pairs), seed=seed, size=(res * 9 // 8, res * 5 // 4))
    cfg = load_config(None, [f"model.pretrained={model}", f"data.source={parquet}", f"data.resolution={res}",
                             f"data.cache_dir={work / 'cache'}"])
    cache = prepare_cache(cfg, progress=False)
    return model, parquet, cache


def parameter_counts(model: Path) -> dict[str, int]:
    """Parameters of each network of a saved pipeline, counted on the model objects (the real classes built
    from the saved configs on the meta device by the planner's builders: no weights are read or allocated)."""
    import torch

    from diffusion_dpo.plan.model import build_encoders, build_network, describe_folder

    desc = describe_folder(model)
    with torch.device("meta"):
        network = build_network(desc)
        vae, encoders = build_encoders(desc, torch.float32)
    nets = {"UNet" if desc.network_class == "UNet2DConditionModel" else "transformer": network, "VAE": vae}
    nets.update({sub.replace("_", " "): enc for (sub, *_), (enc, _) in zip(desc.encoders, encoders)})
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


def run_child(job: dict) -> dict:
    """Run one variant (bench.child.child_main) in a fresh Python process; its result dict."""
    env = dict(os.environ)
    if job["threads"]:
        env["OMP_NUM_THREADS"] = str(job["threads"])
    proc = subprocess.run([sys.executable, "-c", "import sys; from diffusion_dpo.bench.child import child_main; "
                           "sys.exit(child_main(sys.argv[1]))", json.dumps(job)],
                          env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"bench variant {job['variant']} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def least_disturbed(variant: str, old: dict | None, new: dict) -> dict:
    """Of two runs of one variant, the least disturbed: the lower median step; for p, each cost from the round
    where it was lowest."""
    if old is None:
        return new
    if variant != "p":
        return new if new["s_per_step"] < old["s_per_step"] else old
    best = dict(old if old["prepare_s_per_pair"] <= new["prepare_s_per_pair"] else new)
    for key in ("instep_s_per_pair", "cached_s_per_pair"):
        best[key] = min(old[key], new[key])
    return best


def ratios(results: dict) -> dict[str, float]:
    """The comparisons the summary prints, from the variants that ran: a/c, a/d, e/a, e/c, f/a, f/c throughput,
    a/b peak memory,
    and (p) prepare's cost over the in-step encoding and its break-even passes (absent when it never pays)."""
    out: dict[str, float] = {}
    if "a" in results and "c" in results:
        out["a/c pairs/s"] = results["a"]["pairs_per_s"] / results["c"]["pairs_per_s"]
    for fast in "ef":  # the steps without a reference forward, against live (a) and the official design (c)
        for base in "ac":
            if fast in results and base in results:
                out[f"{fast}/{base} pairs/s"] = results[fast]["pairs_per_s"] / results[base]["pairs_per_s"]
    if "a" in results and "d" in results:
        out["a/d pairs/s"] = results["a"]["pairs_per_s"] / results["d"]["pairs_per_s"]
    if "a" in results and "b" in results:
        a, b = results["a"], results["b"]
        out["a/b peak memory"] = a["peak_mem_mb"] / b["peak_mem_mb"]
        if a["device"] == "cpu":
            out["a/b peak memory above imports"] = (a["peak_mem_mb"] - a["base_rss_mb"]) / (b["peak_mem_mb"] - b["base_rss_mb"])
    if "p" in results:
        p = results["p"]
        out["prepare / in-step encoding per pair"] = p["prepare_s_per_pair"] / p["instep_s_per_pair"]
        saved = p["instep_s_per_pair"] - p["cached_s_per_pair"]
        if saved > 0:
            out["break-even passes"] = p["prepare_s_per_pair"] / saved
    return out
