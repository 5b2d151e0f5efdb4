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

Output:
    <out>/images/PPPPP_II.png   every sampled image (evaluate.sampling.image_name)
    <out>/samples.jsonl         every image: prompt_index, image_index, prompt, seed, file, score
    <out>/pairs.jsonl           the toolkit's manifest: prompt, chosen, rejected (relative paths), score_chosen,
                                score_rejected, margin, seeds {chosen, rejected}, image indices, key
    <out>/generation.json       model, sampler, seed rule, judge, strategy: what made the pairs
    <out>/run.json, chunks/     resumable bookkeeping (feedback.chunks); a chunk is `chunk_size` prompts
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
from diffusion_dpo.feedback.chunks import ChunkedRun, dumps_jsonl, save_png_atomic, write_text_atomic

log = logging.getLogger("diffusion_dpo")

STRATEGIES = ("best-worst", "all", "random")
MANIFEST = "pairs.jsonl"
SAMPLES = "samples.jsonl"
RECORD = "generation.json"


def form_pairs(scores: Sequence[float], strategy: str, margin: float = 0.0,
               rng: random.Random | None = None) -> list[tuple[int, int]]:
    """(winner, loser) image indices of one prompt's K scored images, by `strategy`; only pairs whose
    score difference is >= margin and > 0 (an exact tie has no winner)."""
    k = len(scores)
    if strategy == "best-worst":
        order = sorted(range(k), key=lambda i: (-scores[i], i))  # index breaks score ties: deterministic
        candidates = [(order[0], order[-1])] if k >= 2 else []
    elif strategy == "all":
        candidates = list(itertools.combinations(range(k), 2))
    elif strategy == "random":
        perm = list(range(k))
        (rng or random.Random(0)).shuffle(perm)
        candidates = [(perm[2 * m], perm[2 * m + 1]) for m in range(k // 2)]
    else:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    pairs = []
    for a, b in candidates:
        w, l = (a, b) if scores[a] >= scores[b] else (b, a)
        diff = scores[w] - scores[l]
        if diff > 0 and diff >= margin:
            pairs.append((w, l))
    return pairs


@dataclass
class GenerateResult:
    manifest: Path
    prompts: int
    images: int
    pairs: int
    prompts_without_pair: int


def _prompts_fingerprint(prompts: Any) -> str:
    return hashlib.sha256(json.dumps([p.text for p in prompts.prompts]).encode()).hexdigest()[:16]


def generate_chunk(pipe: Any, prompts: Any, indices: range, judge: Any, out: Path, settings: Any, k_images: int,
                   seed: int, strategy: str, margin: float, batch_size: int, bar: Any = None) -> dict:
    """Sample, save, score and pair the prompts `indices`; return the chunk's sample and pair rows."""
    import torch

    from diffusion_dpo.evaluate.sampling import image_name, image_seed

    kwargs: dict[str, Any] = {"num_inference_steps": settings.steps, "output_type": "pil"}
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
        for w, l in form_pairs(scores, strategy, margin, rng):
            sw, sl = samples[n * k_images + w], samples[n * k_images + l]
            pairs.append({"prompt": sw["prompt"], "chosen": sw["file"], "rejected": sl["file"],
                          "score_chosen": sw["score"], "score_rejected": sl["score"],
                          "margin": sw["score"] - sl["score"], "seeds": {"chosen": sw["seed"], "rejected": sl["seed"]},
                          "prompt_index": p, "image_index_chosen": w, "image_index_rejected": l,
                          "key": f"p{p:05d}_{w:02d}>{l:02d}"})
    return {"samples": samples, "pairs": pairs}


def generate_pairs(base: str, prompts: Any, out: str | os.PathLike, judge: Any, *, lora: str | None = None,
                   unet: str | None = None, images_per_prompt: int = 4, strategy: str = "best-worst",
                   margin: float = 0.0, seed: int = 0, preset: str | None = None, sample_batch_size: int = 4,
                   chunk_size: int = 8, device: str = "cpu", dtype: str = "float32", dist: Any = None,
                   progress: bool = True, **overrides: Any) -> GenerateResult | None:
    """Sample `images_per_prompt` images for every prompt of `prompts` (evaluate.prompts.PromptSet) from the
    model (base pipeline, optional LoRA or tuned UNet), score them with `judge`, write pairs into `out`.

    `overrides`: scheduler, steps, guidance, resolution, negative_prompt (evaluate.sampling.resolve_settings).
    Resumable and shardable across processes like `label`. Returns the result on the main process only.
    """
    from tqdm.auto import tqdm

    from diffusion_dpo.cache.prepare import Distribution
    from diffusion_dpo.evaluate.sampling import ModelSpec, _set_scheduler, load_pipeline, resolve_settings
    from diffusion_dpo.models.loading import detect_spec

    if images_per_prompt < 2:
        raise ConfigError(f"--images-per-prompt must be >= 2 to form pairs, got {images_per_prompt}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if margin < 0:
        raise ConfigError(f"--margin must be >= 0, got {margin}")
    dist = dist or Distribution()
    out = Path(out)
    spec = ModelSpec(name="model", base=str(base), lora=lora, unet=unet)
    family = detect_spec(str(base)).family
    settings = resolve_settings(preset, family, **overrides)
    record = {"model": asdict(spec), "family": family, "sampler": asdict(settings), "preset": preset, "seed": seed,
              "seed_rule": "image_seed = sha256(f'{seed}:{prompt_index}:{image_index}')[:8] (63 bits), CPU generator "
                           "(evaluate.sampling.image_seed)",
              "images_per_prompt": images_per_prompt, "strategy": strategy, "margin": margin, "dtype": dtype,
              "prompt_set": prompts.name, "prompts": _prompts_fingerprint(prompts),
              "judge": judge.names, "weights": judge.weights}
    run = ChunkedRun(out, len(prompts), chunk_size, record, dist.rank, dist.world_size, command="generate-pairs")
    if dist.rank == 0:
        run.start()
        (out / "images").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    todo = run.todo()
    if todo:
        pipe = load_pipeline(spec, device, dtype)
        _set_scheduler(pipe, settings.scheduler)
        bar = tqdm(total=sum(len(run.bounds(k)) for k in todo) * images_per_prompt, unit="img",
                   disable=not progress, dynamic_ncols=True,
                   desc=f"generate [{dist.rank}]" if dist.world_size > 1 else "generate")
        for k in todo:
            run.write(k, generate_chunk(pipe, prompts, run.bounds(k), judge, out, settings, images_per_prompt, seed,
                                        strategy, margin, sample_batch_size, bar))
        bar.close()
    dist.barrier()
    if dist.rank != 0:
        return None
    chunks = run.results()
    samples = [r for c in chunks for r in c["samples"]]
    pairs = [r for c in chunks for r in c["pairs"]]
    write_text_atomic(out / SAMPLES, dumps_jsonl(samples))
    write_text_atomic(out / MANIFEST, dumps_jsonl(pairs))
    paired = {r["prompt_index"] for r in pairs}
    result = GenerateResult(out / MANIFEST, len(prompts), len(samples), len(pairs), len(prompts) - len(paired))
    write_text_atomic(out / RECORD, json.dumps({**record, "judge_info": judge.info,
                                                "result": {k: v for k, v in asdict(result).items() if k != "manifest"}},
                                               indent=1, sort_keys=True))
    return result


def describe(result: GenerateResult) -> str:
    return (f"generate-pairs: {result.prompts} prompts, {result.images} images -> {result.pairs} pairs "
            f"({result.prompts_without_pair} prompts gave no pair above the margin) -> {result.manifest}")
