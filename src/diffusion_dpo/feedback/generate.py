"""Generate preference pairs: sample K images per prompt, score them with a judge, pair them by a strategy.

    result = generate_pairs("runwayml/stable-diffusion-v1-5", load_prompts("prompts.txt"), "data/round1",
                            load_judge(["pickscore"]), images_per_prompt=4, strategy="best-worst", margin=0.5)
    # then train with data.source=data/round1/pairs.jsonl

Sampling reuses evaluate.sampling: the same pipeline loading (base, LoRA or tuned UNet), sampler settings
and seed rule, so image i of prompt p is drawn from a CPU generator seeded with image_seed(seed, p, i)
and can be regenerated alone with `diffusion-dpo sample` (same seed, same settings).

Strategies (keep a pair only if winner score - loser score >= margin, and > 0):
    best-worst   the best and the worst image of each prompt: one pair per prompt
    all          every one of the K*(K-1)/2 pairs of a prompt
    random       K//2 disjoint random pairs per prompt (a random.Random seeded by (seed, prompt index))
    all-ranked   every pair, as `all`, each row also recording rank_difference (the loser's rank minus the
                 winner's, ranks by score within the prompt, 0 = best, score ties broken by image index) and
                 images_per_prompt: Curriculum-DPO's pairs (arXiv 2405.13637), whose curriculum reads them
                 (train.curriculum, train/curriculum.py). Its code's thresholds: margin 0.02 for HPS v2.1 and
                 text alignment, 0.2 for aesthetics (shared/REFERENCE.md section 5; docs/feedback.md)

Output:
    <out>/images/PPPPP_II.png   every sampled image (evaluate.sampling.image_name)
    <out>/samples.jsonl         every image: prompt_index, image_index, prompt, seed, file, score
    <out>/pairs.jsonl           the toolkit's manifest: prompt, chosen, rejected (relative paths), score_chosen,
                                score_rejected, margin (the score gap), seeds {chosen, rejected}, image indices,
                                key; all-ranked adds rank_difference, images_per_prompt
    <out>/generation.json       model, sampler, seed rule, judge, strategy: what made the pairs
    <out>/run.json, chunks/     resumable bookkeeping (feedback.chunks); a chunk is `chunk_size` prompts
    <out>/cache/                with write_cache: the pairs as a latent cache (cache.store format, written by
                                cache.writer) from the sampled latents (no VAE encoding): train with
                                data.source=<out>/cache

write_cache: each image's final denoised latent is kept (read from the pipeline's step-end callback, so
sampling and the decoded images are exactly those without it) and stored UNSCALED (models.encode.unscale_latents:
divided by the VAE scaling factor, plus its shift factor for SD3 / Flux; Flux's 2x2 tokens unpacked first by
ModelFamily.image_latents), with each chunk's prompt conditioning, in chunks/latents-NNNNN.safetensors before the
chunk is marked done; the cache is assembled from those files once all chunks are done. Per pair:
latent_mean = the latent that decoded to the image, latent_std = 0 (so data.latent_sampling sample and
mean agree), one variant (no flips), original_size = the image size, crop_top_left = 0.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.feedback.chunks import ChunkedRun, dumps_jsonl

log = logging.getLogger("diffusion_dpo")

STRATEGIES = ("best-worst", "all", "random", "all-ranked")
MANIFEST = "pairs.jsonl"
SAMPLES = "samples.jsonl"
RECORD = "generation.json"
CACHE = "cache"
CACHE_SHARD_SIZE = 256
# what generate-pairs writes into --out besides run.json and chunks/ (for the clean-up of stale temp files);
# <out>/cache/ is wholly ours
OUTPUTS = (MANIFEST, SAMPLES, RECORD, "images/[0-9]*_[0-9]*.png", "chunks/latents-[0-9]*.safetensors", f"{CACHE}/*")


def form_pairs(scores: Sequence[float], strategy: str, margin: float = 0.0,
               rng: random.Random | None = None) -> list[tuple[int, int]]:
    """(winner, loser) image indices of one prompt's K scored images, by `strategy`; only pairs whose
    score difference is >= margin and > 0 (an exact tie has no winner)."""
    k = len(scores)
    if strategy == "best-worst":
        order = sorted(range(k), key=lambda i: (-scores[i], i))  # index breaks score ties: deterministic
        candidates = [(order[0], order[-1])] if k >= 2 else []
    elif strategy in ("all", "all-ranked"):
        candidates = list(itertools.combinations(range(k), 2))
    elif strategy == "random":
        perm = list(range(k))
        (rng or random.Random(0)).shuffle(perm)
        candidates = [(perm[2 * m], perm[2 * m + 1]) for m in range(k // 2)]
    else:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    pairs = []
    for a, b in candidates:  # ">= margin", as `label`: a gap equal to the threshold is kept
        w, l = (a, b) if scores[a] >= scores[b] else (b, a)
        diff = scores[w] - scores[l]
        if diff > 0 and diff >= margin:
            pairs.append((w, l))
    return pairs


def score_ranks(scores: Sequence[float]) -> list[int]:
    """Each image's rank among its prompt's images, 0 = the highest score; equal scores ranked by image index
    (as best-worst orders them), so ranks are a permutation and every kept pair has a rank difference >= 1."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ranks = [0] * len(scores)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


@dataclass
class GenerateResult:
    manifest: Path
    prompts: int
    images: int
    pairs: int
    prompts_without_pair: int
    cache: Path | None = None  # <out>/cache with write_cache


def _prompts_fingerprint(prompts: Any) -> str:
    return hashlib.sha256(json.dumps([p.text for p in prompts.prompts]).encode()).hexdigest()[:16]


def _latents_path(out: Path, k: int) -> Path:
    return out / "chunks" / f"latents-{k:05d}.safetensors"


def _prompt_encoder(pipe: Any, family: Any) -> Any:
    """PromptEncoder (as `prepare` and the trainer use it) over the pipeline's own tokenizer(s) and text encoder(s)."""
    from diffusion_dpo.models.encode import PromptEncoder

    return PromptEncoder(family, family.pipeline_text_encoders(pipe), pipe.device)


def generate_chunk(pipe: Any, prompts: Any, indices: range, judge: Any, out: Path, settings: Any, k_images: int,
                   seed: int, strategy: str, margin: float, batch_size: int, bar: Any = None,
                   latents_path: Path | None = None, family: Any = None) -> dict:
    """Sample, save, score and pair the prompts `indices`; return the chunk's sample and pair rows.

    With `latents_path`, also write every image's final latent (unscaled, float32, in sampling order; `family`: the
    models.families.ModelFamily that unpacks and unscales it) and the prompts' text conditioning there (plus the
    empty prompt's for the first chunk)."""
    import torch

    from diffusion_dpo.evaluate.sampling import image_name, image_seed
    from diffusion_dpo.models.encode import unscale_latents
    from diffusion_dpo.runtime import save_png_atomic, write_safetensors_atomic

    kwargs: dict[str, Any] = {"num_inference_steps": settings.steps, "output_type": "pil"}
    latents: list[torch.Tensor] = []
    captured: dict[str, torch.Tensor] = {}
    if latents_path is not None:
        # the final latent the pipeline decodes: LCM decodes its last `denoised`, the others their last `latents`
        name = "denoised" if "denoised" in getattr(pipe, "_callback_tensor_inputs", ()) else "latents"

        def keep_last(_pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            captured["x"] = tensors[name].detach().to("cpu", torch.float32).clone()
            return {}  # changes nothing: the images are exactly those of a run without write_cache

        kwargs["callback_on_step_end"] = keep_last
        kwargs["callback_on_step_end_tensor_inputs"] = [name]
    if settings.guidance is not None:
        kwargs["guidance_scale"] = settings.guidance
    if settings.resolution is not None:
        kwargs["height"] = kwargs["width"] = settings.resolution
    plan = [(p, i) for p in indices for i in range(k_images)]
    images = []
    for start in range(0, len(plan), batch_size):
        batch = plan[start:start + batch_size]
        if settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
        generators = [torch.Generator("cpu").manual_seed(image_seed(seed, p, i)) for p, i in batch]
        out_images = pipe(prompt=[prompts.prompts[p].text for p, _ in batch], generator=generators, **kwargs).images
        for (p, i), image in zip(batch, out_images):
            save_png_atomic(image, out / "images" / image_name(p, i))
        images += out_images
        if latents_path is not None:  # (N, C, h, w) of the images' size, unshifted and unscaled as `prepare` stores
            width, height = out_images[0].size
            f = family.spec.vae_downsample
            shape = (family.spec.latent_channels, height // f, width // f)
            latents.append(unscale_latents(family.image_latents(captured.pop("x"), shape), family.spec))
        if bar is not None:
            bar.update(len(batch))
    total, parts = judge.score(images, [prompts.prompts[p].text for p, _ in plan])
    samples, pairs = [], []
    for (p, i), s in zip(plan, total.tolist()):
        row = {"prompt_index": p, "image_index": i, "prompt": prompts.prompts[p].text, "seed": image_seed(seed, p, i),
               "file": f"images/{image_name(p, i)}", "score": s}
        if len(parts) > 1:
            row["scores"] = {name: float(v[len(samples)]) for name, v in parts.items()}
        samples.append(row)
    for n, p in enumerate(indices):
        scores = [samples[n * k_images + i]["score"] for i in range(k_images)]
        rng = random.Random(f"{seed}:{p}")
        ranks = score_ranks(scores)
        for w, l in form_pairs(scores, strategy, margin, rng):
            sw, sl = samples[n * k_images + w], samples[n * k_images + l]
            ranked = {"rank_difference": ranks[l] - ranks[w], "images_per_prompt": k_images}
            pairs.append({"prompt": sw["prompt"], "chosen": sw["file"], "rejected": sl["file"],
                          "score_chosen": sw["score"], "score_rejected": sl["score"],
                          "margin": sw["score"] - sl["score"], "seeds": {"chosen": sw["seed"], "rejected": sl["seed"]},
                          "prompt_index": p, "image_index_chosen": w, "image_index_rejected": l,
                          "key": f"p{p:05d}_{w:02d}>{l:02d}", **(ranked if strategy == "all-ranked" else {})})
    if latents_path is not None:
        encoder = _prompt_encoder(pipe, family)
        cond = encoder([prompts.prompts[p].text for p in indices])
        tensors = {"latents": torch.cat(latents), **{name: t.cpu() for name, t in cond.tensors().items()}}
        if indices.start == 0:
            tensors.update({f"empty_{name}": t.cpu() for name, t in encoder([""]).tensors().items()})
        width, height = images[0].size
        # byte-reproducible (sorted header), so a resumed run writes an uninterrupted run's bytes
        write_safetensors_atomic(latents_path, tensors, {"first_prompt": str(indices.start), "images_per_prompt":
                                                         str(k_images), "height": str(height), "width": str(width)},
                                 fsync=False, sorted_header=True)
    return {"samples": samples, "pairs": pairs}


def write_pair_cache(out: Path, run: Any, chunks: list[dict], spec: Any, encoder_dtype: str, storage_dtype: str,
                     shard_size: int = CACHE_SHARD_SIZE) -> Path:
    """Assemble <out>/cache (cache.store format, written by cache.writer) from the chunks' saved latents and the
    pairs, in pairs.jsonl order; the manifest is written last ("complete": true)."""
    import torch
    from safetensors import safe_open

    from diffusion_dpo.cache.writer import CacheWriter, PromptRows, storage_torch_dtype, versioned
    from diffusion_dpo.models.encode import TEXT_FIELDS

    storage = storage_torch_dtype(storage_dtype, "--cache-dtype")
    folder = out / CACHE
    folder.mkdir(parents=True, exist_ok=True)
    pairs_text = (out / MANIFEST).read_text()
    num_pairs = sum(len(c["pairs"]) for c in chunks)
    pretrained = str(Path(spec.pretrained).resolve()) if Path(spec.pretrained).is_dir() else spec.pretrained
    with safe_open(str(_latents_path(out, 0)), "pt") as f:
        meta = f.metadata()
        height, width = int(meta["height"]), int(meta["width"])
        empty = {name: f.get_tensor(f"empty_{name}").to(storage) for name in TEXT_FIELDS if f"empty_{name}" in f.keys()}
    if height != width:
        raise ConfigError(f"write_cache: the cache needs square images, sampled {height}x{width}; pass --resolution")
    writer = CacheWriter(folder, versioned({
        "origin": "generate-pairs", "data": hashlib.sha256(pairs_text.encode()).hexdigest()[:16],
        "model": {"pretrained": pretrained, "revision": spec.revision, "variant": None, "family": spec.family,
                  "vae": None},
        "encoder_dtype": encoder_dtype, "storage_dtype": storage_dtype,
        "transforms": {"resolution": height, "crop": "center", "random_flip": False, "shared_transforms": None,
                       "seed": None}}))
    writer.write_empty_prompt(empty)

    done: dict[int, dict] = {}
    # the prompt table: each distinct prompt text once (first appearance in pairs.jsonl order), its conditioning
    # taken where it first appears
    table = PromptRows([pair["prompt"] for chunk in chunks for pair in chunk["pairs"]])
    text_rows: list[dict] = []
    image_size = torch.tensor([[height, width], [height, width]], dtype=torch.int64)
    rows: list[dict] = []
    n = 0
    for k, chunk in enumerate(chunks):
        if not chunk["pairs"]:
            continue
        first = run.bounds(k).start
        with safe_open(str(_latents_path(out, k)), "pt") as f:
            k_images = int(f.metadata()["images_per_prompt"])
            lat = f.get_tensor("latents")
            text = {name: f.get_tensor(name) for name in TEXT_FIELDS if name in f.keys()}  # (prompts of the chunk, ...)
        for pair in chunk["pairs"]:
            p = pair["prompt_index"] - first
            if table.rows[pair["prompt"]] == len(text_rows):  # the prompt's first pair: its row of the table
                text_rows.append({name: t[p].to(storage) for name, t in text.items()})
            w, l = p * k_images + pair["image_index_chosen"], p * k_images + pair["image_index_rejected"]
            mean = torch.stack([lat[w], lat[l]])[None].to(storage)  # (V=1, 2, C, h, w)
            row = {"source_index": torch.tensor(n, dtype=torch.int64),
                   "prompt_index": torch.tensor(table.rows[pair["prompt"]], dtype=torch.int64), "latent_mean": mean,
                   "latent_std": torch.zeros_like(mean), "original_size": image_size.clone(),
                   "crop_top_left": torch.zeros(1, 2, 2, dtype=torch.int64)}
            rows.append(row)
            n += 1
            if len(rows) == shard_size or n == num_pairs:  # a full shard, or the last pairs
                tensors = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}
                done[len(done)] = writer.write_shard(len(done), tensors, n - len(rows), n)
                rows = []
    prompts_done = {}
    for j, start in enumerate(range(0, len(text_rows), shard_size)):
        part = text_rows[start:start + shard_size]
        prompts_done[j] = writer.write_prompt_shard(j, {name: torch.stack([r[name] for r in part]) for name in part[0]},
                                                    start, table.prompts[start:start + shard_size])
    settings = {"resolution": height, "crop": "center", "random_flip": False, "shared_transforms": False,
                "seed": None, "storage_dtype": storage_dtype, "encoder_dtype": encoder_dtype,
                "latents": "sampled (generate-pairs): latent_mean = the final denoised latent / "
                           "vae_scaling_factor + vae_shift_factor, latent_std = 0"}
    source = {"format": "generate-pairs", "manifest": str((out / MANIFEST).resolve()),
              "fingerprint": writer.inputs["data"]}
    manifest = writer.manifest(spec, pretrained, settings, source, num_pairs, shard_size, len(done), done,
                               len(table.prompts), prompts_done)
    writer.finish(manifest, done, prompts_done)
    return folder


def generate_pairs(base: str, prompts: Any, out: str | os.PathLike, judge: Any, *, lora: str | None = None,
                   unet: str | None = None, images_per_prompt: int = 4, strategy: str = "best-worst",
                   margin: float = 0.0, seed: int = 0, preset: str | None = None, sample_batch_size: int = 4,
                   chunk_size: int = 8, device: str = "cpu", dtype: str = "float32", dist: Any = None,
                   progress: bool = True, write_cache: bool = False, cache_dtype: str = "float16",
                   **overrides: Any) -> GenerateResult | None:
    """Sample `images_per_prompt` images for every prompt of `prompts` (evaluate.prompts.PromptSet) from the
    model (base pipeline, optional LoRA or tuned UNet), score them with `judge`, write pairs into `out`.

    `overrides`: scheduler, steps, guidance, resolution, negative_prompt (evaluate.sampling.resolve_settings).
    `write_cache`: also write <out>/cache, a latent cache of the pairs (cache.store format, latents and
    embeddings stored as `cache_dtype`) from the sampled latents; `train` reads it with data.source=<out>/cache.
    Resumable and shardable across processes like `label`. Returns the result on the main process only.
    """
    from tqdm.auto import tqdm

    from diffusion_dpo.evaluate.sampling import SampledModel, load_sampling_pipeline, resolve_settings, set_scheduler
    from diffusion_dpo.models.families import detect_spec, family_of
    from diffusion_dpo.models.loading import PipelineConfigs
    from diffusion_dpo.runtime import ProcessInfo, write_text_atomic

    if images_per_prompt < 2:
        raise ConfigError(f"--images-per-prompt must be >= 2 to form pairs, got {images_per_prompt}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if margin < 0:
        raise ConfigError(f"--margin must be >= 0, got {margin}")
    if write_cache:
        from diffusion_dpo.cache.writer import storage_torch_dtype

        storage_torch_dtype(cache_dtype, "--cache-dtype")
    dist = dist or ProcessInfo()
    out = Path(out)
    spec = SampledModel(name="model", base=str(base), lora=lora, unet=unet)
    model_spec = detect_spec(str(base))
    family = model_spec.family
    settings = resolve_settings(preset, family, PipelineConfigs(str(base)), **overrides)
    record = {"model": asdict(spec), "family": family, "sampler": asdict(settings), "preset": preset, "seed": seed,
              "seed_rule": "image_seed = sha256(f'{seed}:{prompt_index}:{image_index}')[:8] (63 bits), CPU generator "
                           "(evaluate.sampling.image_seed)",
              "images_per_prompt": images_per_prompt, "strategy": strategy, "margin": margin, "dtype": dtype,
              "prompt_set": prompts.name, "prompts": _prompts_fingerprint(prompts),
              "judge": judge.names, "weights": judge.weights}
    if write_cache:  # only then: the record (and run.json) of a run without it stay as they were
        record["write_cache"] = True  # a resumed run needs every chunk's latents (cache_dtype only matters at the end)
    run = ChunkedRun(out, len(prompts), chunk_size, record, dist.rank, dist.world_size, command="generate-pairs",
                     outputs=OUTPUTS)
    if dist.rank == 0:
        run.start()
        (out / "images").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    todo = run.todo()
    if todo:
        pipe = load_sampling_pipeline(spec, device, dtype)
        set_scheduler(pipe, settings.scheduler)
        bar = tqdm(total=sum(len(run.bounds(k)) for k in todo) * images_per_prompt, unit="img",
                   disable=not progress, dynamic_ncols=True,
                   desc=f"generate [{dist.rank}]" if dist.world_size > 1 else "generate")
        for k in todo:
            run.write(k, generate_chunk(pipe, prompts, run.bounds(k), judge, out, settings, images_per_prompt, seed,
                                        strategy, margin, sample_batch_size, bar,
                                        latents_path=_latents_path(out, k) if write_cache else None,
                                        family=family_of(model_spec)))
        bar.close()
    dist.barrier()
    if dist.rank != 0:
        return None
    chunks = run.results()
    samples = [r for c in chunks for r in c["samples"]]
    pairs = [r for c in chunks for r in c["pairs"]]
    write_text_atomic(out / SAMPLES, dumps_jsonl(samples), fsync=False)
    write_text_atomic(out / MANIFEST, dumps_jsonl(pairs), fsync=False)
    paired = {r["prompt_index"] for r in pairs}
    result = GenerateResult(out / MANIFEST, len(prompts), len(samples), len(pairs), len(prompts) - len(paired))
    if write_cache and chunks:
        result.cache = write_pair_cache(out, run, chunks, model_spec, dtype, cache_dtype)
    write_text_atomic(out / RECORD, json.dumps({**record, "judge_info": judge.info,
                                                "result": {k: v for k, v in asdict(result).items()
                                                           if k not in ("manifest", "cache")}},
                                               indent=1, sort_keys=True), fsync=False)
    return result


def describe(result: GenerateResult) -> str:
    return (f"generate-pairs: {result.prompts} prompts, {result.images} images -> {result.pairs} pairs "
            f"({result.prompts_without_pair} prompts gave no pair above the margin) -> {result.manifest}"
            + (f"; latent cache -> {result.cache}" if result.cache is not None else ""))
