"""The Diffusion-DPO / SFT training recipe.

`Trainer(cfg).setup()` builds everything in a fixed order; `train()` runs the loop top to bottom.
Runs unchanged on one CPU or under `accelerate launch` on many GPUs (DDP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.config import RunConfig, to_dict
from diffusion_dpo.errors import NonFiniteLossError
from diffusion_dpo.losses import build_loss
from diffusion_dpo.models.diffusion import draw_pair_randomness, pair_generator
from diffusion_dpo.models.encode import PromptEncoder, TextConditioning, encode_images, sample_latents, sdxl_time_ids
from diffusion_dpo.models.loading import (DTYPES, detect_spec, load_noise_scheduler, load_text_encoders, load_unet,
                                          load_vae, spec_dict)
from diffusion_dpo.train import checkpoint as ckpt
from diffusion_dpo.train.optim import build_lr_scheduler, build_optimizer
from diffusion_dpo.train.run_dir import RunDir
from diffusion_dpo.train.sampler import PairBatchSampler
from diffusion_dpo.train.step import PairBatch, UNetCaller, preference_step

log = logging.getLogger("diffusion_dpo")

METRIC_KEYS = ("loss", "implicit_acc", "err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l", "diff_policy",
               "diff_ref", "inside")


class _EpochItems(torch.utils.data.Dataset):
    """Adapts a dataset indexed by int to items addressed as (epoch, index), so random transforms
    are seeded per epoch and per pair."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        if item is not None:
            item["epoch"] = epoch
        return item


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator=None, progress: bool = True):
        self.cfg = cfg
        self.accelerator = accelerator
        self.progress = progress
        self.out = Path(cfg.output.dir)

    # ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.cfg
        # 1. distribution and precision
        report = cfg.output.report_to
        if report == "auto":
            import importlib.util

            report = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        self.report_to = report
        if self.accelerator is None:
            from accelerate import Accelerator

            self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                           log_with=None if report == "none" else report, project_dir=str(self.out))
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.run_dir = RunDir.claim(cfg, self.is_main)  # lock output.dir; refuse a foreign folder or a mismatched resume
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.train.seed)  # model init (LoRA A matrices) identical on every process

        # 2. model family and frozen parts
        m = cfg.model
        self.spec = detect_spec(m.pretrained, m.revision, m.variant, m.family, m.prediction_type)
        frozen_dtype = DTYPES[m.frozen_dtype]
        self.noise_scheduler = load_noise_scheduler(self.spec)
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.call = UNetCaller(self.spec.family, m.lcm_guidance_scale, self.spec.time_cond_proj_dim)

        # 3. data: a prepared cache (no VAE, no text encoder in memory) or images encoded on the fly
        self.dataset, self.cached = self._build_dataset()
        if self.cached:
            self.vae = self.prompt_encoder = None
            self.empty_cond = self.dataset.empty_conditioning()
        else:
            self.vae = load_vae(self.spec, frozen_dtype, m.vae).to(self.device)
            self.prompt_encoder = PromptEncoder(self.spec.family, load_text_encoders(self.spec, frozen_dtype), self.device)
            self.prompt_encoder.to(self.device)
            self.empty_cond = self.prompt_encoder([""])

        # 4. trained network and reference policy
        self.loss_fn = build_loss(cfg.train.method, cfg.train.beta)
        self.unet = load_unet(self.spec, torch.float32)
        lora = cfg.train.finetune == "lora"
        if lora:
            from diffusion_dpo.models.lora import add_lora

            if cfg.model.frozen_dtype != "float32":
                self.unet.to(frozen_dtype)  # frozen base in half precision; add_lora keeps adapters in fp32
            add_lora(self.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                     cfg.lora.init_weights)
        self.unet.to(self.device)
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.train.lean_autograd:
            from diffusion_dpo.models import lean_autograd

            lean_autograd.apply(self.unet)
        self.reference = None
        if self.loss_fn.needs_reference:
            from diffusion_dpo.models.lora import Reference

            ref_dtype = DTYPES[m.reference_dtype or m.frozen_dtype]
            self.reference = Reference(self.unet, lora=lora, dtype=ref_dtype, offload=m.reference_on_cpu)
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]

        # 5. optimizer and schedule
        lr = cfg.train.learning_rate
        if cfg.train.scale_lr:
            lr *= cfg.train.batch_size * cfg.train.gradient_accumulation * acc.num_processes
        self.optimizer = build_optimizer(cfg.train, self.params, lr)
        self.lr_scheduler = build_lr_scheduler(cfg.train.lr_scheduler, self.optimizer, cfg.warmup, cfg.train.max_steps)
        # The LR scheduler is stepped by hand once per optimizer step (accelerate would step it once per process).
        self.unet, self.optimizer = acc.prepare(self.unet, self.optimizer)

        # 6. resume
        self.step = 0
        self.skipped_steps = 0
        self.skipped_pairs = 0
        if cfg.train.resume != "never":  # "force": RunDir.claim has checked and recorded the changes
            latest = ckpt.latest(self.out / "checkpoints")
            if latest is not None:
                state = ckpt.load(latest, acc.unwrap_model(self.unet), self.optimizer, self.lr_scheduler)
                self.step = state["step"]
                self.skipped_steps = state.get("skipped_steps", 0)
                self.skipped_pairs = state.get("skipped_pairs", 0)
                log.info("resumed from %s (step %d)", latest, self.step)

        # 7. order of pairs, positioned after the last completed optimizer step
        self.sampler = PairBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.train.seed, acc.process_index,
                                        acc.num_processes, start_micro_batch=self.step * cfg.train.gradient_accumulation)
        collate = self._collate_fn()
        self.loader = torch.utils.data.DataLoader(_EpochItems(self.dataset), batch_sampler=self.sampler,
                                                  collate_fn=collate, num_workers=cfg.data.num_workers)
        return self

    def _build_dataset(self):
        d = self.cfg.data
        if d.format == "cache" or (d.format == "auto" and Path(d.source, "cache_manifest.json").is_file()):
            from diffusion_dpo.cache.store import CachedPairDataset

            return CachedPairDataset(d.source, self.spec, d.latent_sampling, seed=self.cfg.train.seed,
                                     resolution=d.resolution), True
        if d.cache_dir:  # prepared on the fly once (or found complete) and reused by every later run
            from diffusion_dpo.cache.prepare import ensure_cache
            from diffusion_dpo.cache.store import CachedPairDataset

            folder = ensure_cache(self.cfg, self.accelerator, storage_dtype=d.cache_dtype)
            return CachedPairDataset(folder, self.spec, d.latent_sampling, seed=self.cfg.train.seed,
                                     resolution=d.resolution), True
        from diffusion_dpo.data.dataset import PairDataset
        from diffusion_dpo.data.sources import open_source
        from diffusion_dpo.data.transforms import PairTransform

        source = open_source(d)  # logs what it read, ties dropped and missing files
        transform = PairTransform(d.resolution, d.crop, d.random_flip, d.shared_transforms)
        return PairDataset(source, transform, seed=self.cfg.train.seed, on_corrupt=d.on_corrupt), False

    def _collate_fn(self):
        if self.cached:
            from diffusion_dpo.cache.store import collate_cached as collate
        else:
            from diffusion_dpo.data.dataset import collate_pairs as collate

        def collate_with_epochs(items):
            batch = collate(items)
            batch["epochs"] = torch.tensor([it["epoch"] for it in items if it is not None], dtype=torch.long)
            return batch

        return collate_with_epochs

    # ------------------------------------------------------------------------------------------
    def encode_batch(self, raw: dict[str, Any]) -> Optional[PairBatch]:
        """Raw (pixels + prompts) or cached batch -> PairBatch with this pair's own randomness."""
        cfg, spec = self.cfg, self.spec
        b = len(raw["indices"])
        if b == 0:
            return None
        res = cfg.data.resolution
        latent_shape = (spec.latent_channels, res // spec.vae_downsample, res // spec.vae_downsample)
        lo, hi = cfg.train.timestep_range
        hi = min(hi, spec.num_train_timesteps)
        gens = [pair_generator(cfg.train.seed, int(e), int(i)) for e, i in zip(raw["epochs"], raw["indices"])]
        rnd = draw_pair_randomness(gens, latent_shape, lo, hi, cfg.data.caption_dropout)
        if self.cached:
            mean, std = raw["latent_mean"].to(self.device), raw["latent_std"].to(self.device)
            cond = TextConditioning(raw["prompt_embeds"], raw.get("pooled_prompt_embeds")).to(self.device)
        else:
            pixels = raw["pixel_values"].to(self.device)  # (B, 2, 3, R, R)
            mean, std = encode_images(self.vae, pixels.flatten(0, 1))  # (2B, C, h, w), rows w0,l0,w1,l1,...
            mean, std = mean.unflatten(0, (b, 2)), std.unflatten(0, (b, 2))
            cond = self.prompt_encoder(list(raw["prompts"]))
        mode = cfg.data.latent_sampling
        sf = spec.vae_scaling_factor
        lat_w = sample_latents(mean[:, 0], std[:, 0], sf, rnd["latent_eps_w"].to(self.device), mode)
        lat_l = sample_latents(mean[:, 1], std[:, 1], sf, rnd["latent_eps_l"].to(self.device), mode)
        if cfg.data.caption_dropout > 0:
            cond = cond.select(rnd["drop_caption"], self.empty_cond.to(self.device))
        time_ids = None
        if spec.family == "sdxl":
            sizes, crops = raw["original_size"], raw["crop_top_left"]  # (B, 2, 2)
            time_ids = torch.cat([sdxl_time_ids(sizes[:, 0], crops[:, 0], res),
                                  sdxl_time_ids(sizes[:, 1], crops[:, 1], res)]).to(self.device)
        return PairBatch(lat_w, lat_l, cond, rnd["noise"].to(self.device), rnd["timesteps"].to(self.device), time_ids)

    def micro_step(self, raw: dict[str, Any]):
        batch = self.encode_batch(raw)
        if batch is None:  # every pair of this micro-batch was corrupt: keep processes in step with a zero loss
            zero = sum(p.sum() for p in self.params) * 0.0
            return zero, {}, 0
        with self.accelerator.autocast():
            out = preference_step(self.unet, self.reference, self.loss_fn, self.noise_scheduler, batch, self.call,
                                  self.cfg.train.error_reduction)
        metrics = {"loss": out.loss.detach(), **out.metrics}
        return out.loss, metrics, batch.size

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to train.max_steps; the main process also logs to output.dir/train.log."""
        if not self.is_main:
            return self._train()
        self.out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:  # the file gets INFO lines even when the caller set up no logging
            log.setLevel(logging.INFO)
        try:
            return self._train()
        finally:
            log.removeHandler(handler)
            handler.close()
            self.run_dir.release()

    def _train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        ga = cfg.train.gradient_accumulation
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.run_dir.write_config(cfg)
            (self.out / "model_spec.json").write_text(json.dumps(spec_dict(self.spec), indent=2))
            ckpt.truncate_metrics(self.out / "metrics.jsonl", self.step)
            if self.report_to != "none":
                acc.init_trackers("diffusion-dpo", config=_flat(to_dict(cfg)))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (self.is_main and self.progress),
                   desc=cfg.train.method, dynamic_ncols=True)
        batches = iter(self.loader)
        t0 = time.perf_counter()
        start_step = self.step
        history: list[dict] = []
        while self.step < cfg.train.max_steps:
            sums: dict[str, torch.Tensor] = {}
            pairs = 0
            for micro in range(ga):
                raw = next(batches)
                self.skipped_pairs += int(raw.get("num_skipped", 0))
                sync = micro == ga - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.unet)
                with ctx:
                    loss, metrics, n = self.micro_step(raw)
                    acc.backward(loss / ga)
                pairs += n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
            metrics = {k: v / ga for k, v in sums.items()}
            metrics = {k: acc.reduce(v.reshape(1).to(self.device), "mean").item() for k, v in sorted(metrics.items())}
            finite = torch.tensor([1.0 if all(math.isfinite(v) for v in metrics.values()) else 0.0], device=self.device)
            finite = acc.reduce(finite, "min").item() > 0
            grad_norm = float("nan")
            if finite:
                if cfg.train.max_grad_norm is not None:
                    grad_norm = float(acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm))
                else:
                    grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
                finite = math.isfinite(grad_norm)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.train.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {self.step + 1} (metrics {metrics}, grad norm {grad_norm}). "
                        "Lower train.learning_rate or train.beta, use bf16 instead of fp16, or set train.on_nonfinite=skip "
                        "to skip such steps (they are counted in metrics.jsonl)")
                self.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", self.step + 1,
                            self.skipped_steps)
            else:
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            record = {"step": self.step, **metrics, "grad_norm": grad_norm, "lr": self.lr_scheduler.get_last_lr()[0],
                      "pairs": pairs * acc.num_processes, "skipped_steps": self.skipped_steps,
                      "skipped_pairs": self.skipped_pairs}
            history.append(record)
            if self.is_main:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.report_to != "none" and self.step % cfg.train.log_every == 0:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_acc", "grad_norm") if k in record})
                bar.update(1)
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        acc.wait_for_everyone()
        elapsed = time.perf_counter() - t0
        summary = self.save_outputs(history, elapsed, self.step - start_step)
        acc.end_training()
        log.info("finished: %s", json.dumps(summary))
        return summary

    def save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            ckpt.save(self.out / "checkpoints", self.step, self.accelerator.unwrap_model(self.unet), self.optimizer,
                      self.lr_scheduler, self.cfg, {"skipped_steps": self.skipped_steps, "skipped_pairs": self.skipped_pairs},
                      self.cfg.train.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()

    def save_outputs(self, history: list[dict], elapsed: float, steps_run: int) -> dict[str, Any]:
        from diffusion_dpo.train.outputs import write_final_outputs

        summary = {"steps": self.step, "steps_this_run": steps_run, "seconds": round(elapsed, 2),
                   "skipped_steps": self.skipped_steps, "skipped_pairs": self.skipped_pairs}
        if history:
            last = history[-min(len(history), 10):]
            for key in ("loss", "implicit_acc"):
                if key in last[0]:
                    summary[f"{key}_last10"] = sum(r[key] for r in last) / len(last)
        if self.is_main:
            write_final_outputs(self.out, self.accelerator.unwrap_model(self.unet), self.cfg, self.spec, summary)
        return summary


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Python entry point: `diffusion_dpo.train.trainer.train(load_config(path, overrides))`."""
    return Trainer(cfg, progress=progress).setup().train()
