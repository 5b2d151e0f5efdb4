"""Rounds of AI feedback: generate pairs from the current model, judge them, (prepare,) train, repeat.

    cfg = load_config("configs/sd15_dpo.yaml", ["train.max_steps=200"])
    iterate(cfg, load_prompts("prompts.txt"), load_judge(["pickscore"]), "runs/online", rounds=3)

One folder per round:

    <out>/round-001/pairs/        generate-pairs output (images, samples.jsonl, pairs.jsonl); the reward that
                                  scores the K samples is the label: the step "label" happens here
    <out>/round-001/config.yaml   the training config of this round (model.pretrained = this round's reference)
    <out>/round-001/train/        the trainer's output dir (checkpoints, LoRA or unet/)
    <out>/round-001/model/        with update_reference: a full pipeline folder with this round's result
                                  fused in (LoRA merged, or the tuned UNet); round 2 samples from it and
                                  uses it as its DPO reference (model.pretrained)
    <out>/round-001/round.json    what the round used and produced; written last: the round is done

Resumable at any step: generate-pairs and prepare skip finished chunks/shards, the trainer resumes from
its latest checkpoint (train.resume=auto), and the fused model folder is moved into place atomically.
Round r samples with seed + r - 1, so rounds do not repeat the same noise.

Without update_reference every round samples from and trains against the starting model (fresh pairs
each round, separate results).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from diffusion_dpo.config import RunConfig, save_config
from diffusion_dpo.errors import ConfigError, UserError

log = logging.getLogger("diffusion_dpo")


def round_dir(out: str | os.PathLike, r: int) -> Path:
    return Path(out) / f"round-{r:03d}"


def fuse_model(base: str, train_dir: str | os.PathLike, finetune: str, out: str | os.PathLike) -> Path:
    """A full pipeline folder `out` = `base` with the training result in `train_dir` built in: a LoRA
    (pytorch_lora_weights.safetensors) fused into the trained network (UNet or SD3 / Flux transformer), or a tuned
    unet/ (transformer/) swapped in; loaded as `sample` loads it (evaluate.sampling.load_sampling_pipeline). Written
    to a temporary folder and renamed, so `out` exists complete or not at all."""
    from diffusion_dpo.evaluate.sampling import SampledModel, load_sampling_pipeline
    from diffusion_dpo.models.families import detect_spec, family_named

    out, train_dir = Path(out), Path(train_dir)
    if finetune == "lora":
        if not (train_dir / "pytorch_lora_weights.safetensors").is_file():
            raise UserError(f"{train_dir}: no pytorch_lora_weights.safetensors to fuse; did training finish?")
        pipe = load_sampling_pipeline(SampledModel("model", base, lora=str(train_dir)))
        pipe.fuse_lora()  # W <- W + scale * B A, in place
        pipe.unload_lora_weights()  # drop the adapter modules, keep the fused weights
    else:
        sub = family_named(detect_spec(base).family).network_folder
        if not (train_dir / sub / "config.json").is_file():
            raise UserError(f"{train_dir}: no {sub}/ folder to build the next model from; did training finish?")
        pipe = load_sampling_pipeline(SampledModel("model", base, unet=str(train_dir / sub)))
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def iterate(cfg: RunConfig, prompts: Any, judge: Any, out: str | os.PathLike, rounds: int, *,
            images_per_prompt: int = 4, strategy: str = "best-worst", margin: float = 0.0, seed: int = 0,
            update_reference: bool = True, preset: str | None = None, sample_batch_size: int = 4, chunk_size: int = 8,
            device: str | None = None, dtype: str = "float32", dist: Any = None, progress: bool = True,
            **overrides: Any) -> list[dict]:
    """Run `rounds` rounds (skipping finished ones); return every round's record (round.json).

    `cfg` is the training config of every round (model.pretrained: the starting model); per round,
    model.pretrained, data.source/format and output.dir are replaced. Sampler `overrides` as in
    generate_pairs (resolution defaults to data.resolution).
    """
    from diffusion_dpo.cache.prepare import prepare_cache
    from diffusion_dpo.feedback.generate import generate_pairs
    from diffusion_dpo.runtime import ProcessInfo, write_text_atomic
    from diffusion_dpo.train.trainer import train

    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if not cfg.model.pretrained:
        raise ConfigError("model.pretrained is empty: set the starting model in the config or as an override")
    dist = dist or ProcessInfo()
    device = device or str(dist.device)
    out = Path(out)
    overrides = {**overrides, "resolution": overrides.get("resolution") or cfg.data.resolution}
    reference = cfg.model.pretrained
    records = []
    for r in range(1, rounds + 1):
        rdir = round_dir(out, r)
        done = rdir / "round.json"
        if done.is_file():
            record = json.loads(done.read_text())
            log.info("round %d already done: %s", r, record.get("result_model") or record["train_dir"])
            records.append(record)
            if update_reference:
                reference = record["result_model"]
            continue
        print(f"== round {r}/{rounds}: sampling from and training against {reference}")
        # 1. generate + label: K samples per prompt, judged, paired
        gen = generate_pairs(reference, prompts, rdir / "pairs", judge, images_per_prompt=images_per_prompt,
                             strategy=strategy, margin=margin, seed=seed + r - 1, preset=preset,
                             sample_batch_size=sample_batch_size, chunk_size=chunk_size, device=device, dtype=dtype,
                             dist=dist, progress=progress, **overrides)
        manifest = rdir / "pairs" / "pairs.jsonl"
        if dist.rank == 0 and gen is not None and gen.pairs == 0:
            raise UserError(f"round {r}: no pair reached --margin {margin} ({gen.images} images); lower --margin, "
                            f"raise --images-per-prompt or use --strategy all")
        # 2. this round's training config: its reference is the current model
        rcfg = copy.deepcopy(cfg)
        rcfg.model.pretrained = str(reference)
        rcfg.data.source, rcfg.data.format = str(manifest), "manifest"
        rcfg.output.dir = str(rdir / "train")
        if dist.rank == 0:
            save_config(rcfg, rdir / "config.yaml")
        # 3. prepare: the latent cache, when the config uses one
        if rcfg.data.cache_dir:
            prepare_cache(rcfg, dist=dist, progress=progress and dist.rank == 0)
        # 4. train (resumes from its latest checkpoint after an interruption)
        summary_file = rdir / "train" / "train_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else train(rcfg)
        dist.barrier()
        # 5. the next round's reference and sampler
        result_model = None
        if update_reference:
            result_model = str(rdir / "model")
            if dist.rank == 0 and not (rdir / "model" / "model_index.json").is_file():
                fuse_model(str(reference), rdir / "train", cfg.train.finetune, rdir / "model")
            dist.barrier()
        record = {"round": r, "reference": str(reference), "seed": seed + r - 1, "pairs": str(manifest),
                  "num_pairs": gen.pairs if gen is not None else None, "train_dir": str(rdir / "train"),
                  "result_model": result_model, "train_summary": {k: v for k, v in summary.items()
                                                                  if isinstance(v, (int, float, str))}}
        if dist.rank == 0:
            write_text_atomic(done, json.dumps(record, indent=1, sort_keys=True), fsync=False)
        dist.barrier()
        records.append(record)
        if update_reference:
            reference = result_model
    return records
