"""The Diffusion-DPO / SFT training recipe.

`Trainer(cfg).setup()` builds everything in a fixed order; `train()` runs the loop top to bottom.
Runs unchanged on one CPU or under `accelerate launch` with DDP, FSDP2 or DeepSpeed ZeRO (train.engine,
docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.config import RunConfig, reference_strategy, to_dict
from diffusion_dpo.errors import ConfigError, DataError, NonFiniteLossError, TrainingInterrupted
from diffusion_dpo.losses import build_loss, check_data
from diffusion_dpo.models.families import detect_spec, family_of
from diffusion_dpo.models.loading import spec_dict
from diffusion_dpo.runtime import ProcessInfo, torch_dtype
from diffusion_dpo.typed_config import flatten
from diffusion_dpo.train import checkpoint as ckpt, engine, sharded_state
from diffusion_dpo.train.batch import EpochItems, open_pairs
from diffusion_dpo.train.interrupt import StopSignals
from diffusion_dpo.train.optim import apply_gradients, build_lr_scheduler, build_optimizer
from diffusion_dpo.train.curriculum import order_pairs
from diffusion_dpo.train.curriculum_model import RankSchedule
from diffusion_dpo.train.run_dir import RunDir
from diffusion_dpo.train.step import preference_step

log = logging.getLogger("diffusion_dpo")

# Counters kept across resumes (trainer_state.json) and logged with every step in metrics.jsonl.
COUNTS = ("trained_pairs", "skipped_pairs", "skipped_steps", "overflow_steps")
METRIC_KEYS = ("loss", "implicit_acc", "err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l", "diff_policy",
               "diff_ref", "inside")


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator=None, progress: bool = True):
        self.cfg = cfg
        self.accelerator = accelerator
        self.progress = progress
        self.out = Path(cfg.output.dir)

    # ------------------------------------------------------------------------------------------
    def _detect_family(self, cfg: RunConfig) -> RunConfig:
        """2. model family, read from the pipeline's configs (no weights): everything family-specific is asked of
        this object. Returns `cfg` with the defaults that depend on it."""
        m = cfg.model
        self.spec = detect_spec(m.pretrained, m.revision, m.variant, m.family, m.prediction_type)
        self.family = family_of(self.spec, m.lcm_guidance_scale, cfg.flow)
        return cfg.with_network_defaults(self.family.lora_targets)

    def setup(self) -> "Trainer":
        cfg = self.cfg
        # 1. distribution and precision
        report = cfg.output.report_to
        if report == "auto":
            import importlib.util

            report = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        self.report_to = report
        if self.accelerator is None:
            self.accelerator = engine.build_accelerator(cfg.train, None if report == "none" else report, str(self.out))
        acc = self.accelerator
        self.ranks = RankSchedule.of(cfg)  # train.curriculum.rank_schedule (Curriculum-DPO++): None when off
        self.sharded = engine.is_sharded(acc)  # FSDP2, DeepSpeed: checkpoints and final outputs go through engine
        if self.ranks is not None and (acc.num_processes > 1 or self.sharded):
            raise ConfigError("train.curriculum.rank_schedule runs on one process without FSDP / DeepSpeed only (they "
                              "cannot swap the parameters they hold mid-run): launch one plain process, or remove it")
        self.last_raw: Optional[dict[str, Any]] = None  # this process's last micro-batch with a pair (empty_micro_step)
        engine.check_config(acc, cfg.model.reference_on_cpu)
        log.info("engine: %s, %d process(es)", engine.name(acc), acc.num_processes)
        self.device = acc.device
        self.is_main = acc.is_main_process
        # lock output.dir, refuse a foreign folder; then 2. (the family) and the check of a resume against the
        # config with the family's defaults filled in (lora.target_modules), which config.yaml then records
        self.run_dir = RunDir.claim(cfg, self.is_main, resolve=self._detect_family)
        self.cfg = cfg = self.run_dir.cfg
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.train.seed)  # model init (LoRA A matrices) identical on every process
        m = cfg.model
        self.family.check_settings(cfg)
        frozen_dtype = torch_dtype(m.frozen_dtype, "model.frozen_dtype")
        self.noise_scheduler = self.family.load_noise_scheduler(self.device)

        # 3. data and the one encoder that turns its raw batches into PairBatches: a prepared cache (no VAE,
        # no text encoder in memory) or images encoded on the fly
        pairs = open_pairs(cfg, self.family, acc)
        self.loss_fn = build_loss(cfg.train.method, cfg.train.beta, cfg.loss)
        check_data(self.loss_fn, cfg.train.method, pairs.labelled, cfg.data.source)  # pairs vs labelled images
        self.dataset = pairs.dataset
        from diffusion_dpo.data.sources import check_fills_batch  # before the models load: fail fast

        check_fills_batch(len(self.dataset), cfg.train.batch_size, acc.num_processes, pairs.source_stats)
        self.batch_encoder = pairs.encoder(cfg, self.family, self.device)
        # train.reference=cached: the reference's errors of every pair, computed before the policy loads (its own
        # network is freed after) or read from the store beside the cache
        self.reference_store = None
        if reference_strategy(cfg.train) == "cached":
            from diffusion_dpo.train.reference_cache import ensure_reference

            self.reference_store = ensure_reference(cfg, self.family, self.noise_scheduler, pairs, acc.autocast,
                                                    ProcessInfo.from_accelerate(acc), self.progress and self.is_main)

        # 4. trained network and reference policy
        self.unet = self.family.load_network(torch.float32)
        lora = cfg.train.finetune == "lora"
        if lora:
            from diffusion_dpo.models.lora import add_lora

            if cfg.model.frozen_dtype != "float32":
                self.unet.to(frozen_dtype)  # frozen base in half precision; add_lora keeps adapters in fp32
            # with a rank schedule the adapter starts at the first rank, at the final alpha / rank scale
            rank, alpha = (cfg.lora.rank, cfg.lora.alpha) if self.ranks is None else \
                (self.ranks.ranks[0], self.ranks.first_alpha)
            add_lora(self.unet, rank, alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.init_weights)
        self.unet.to(self.device)
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.train.lean_autograd:
            from diffusion_dpo.models import lean_autograd

            lean_autograd.apply(self.unet)
        self.reference = None
        if reference_strategy(cfg.train) == "live":  # 'none' and 'cached' keep no reference network
            from diffusion_dpo.models.reference import Reference

            ref_dtype = torch_dtype(m.reference_dtype or m.frozen_dtype, "model.reference_dtype")
            place = (lambda net: engine.shard_frozen(acc, net)) if self.sharded else None
            self.reference = Reference(self.unet, lora=lora, dtype=ref_dtype, offload=m.reference_on_cpu, place=place)
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
        self.params = [p for p in self.unet.parameters() if p.requires_grad]  # FSDP2 replaced them by DTensor shards

        # 6. resume: weights, optimizer, schedule and loss scale now; the RNG only once the loader's iterator
        # exists (creating it draws from the global RNG, which would shift every later dropout mask)
        self.step = 0
        self.counts = {key: 0 for key in COUNTS}
        self.resume_rng: Optional[dict] = None
        if cfg.train.resume != "never":  # "force": RunDir.claim has checked and recorded the changes
            state = ckpt.read_latest(self.out / "checkpoints")
            if state is not None:
                if self.ranks is not None:  # the checkpoint's adapter may have grown already: grow this one first
                    self.grow(state.state.get("lora_rank", self.ranks.rank_after(state.state["step"])))
                ckpt.apply(state, cfg, self.unet if self.sharded else acc.unwrap_model(self.unet), self.optimizer,
                           self.lr_scheduler, acc.scaler, sharded_state.load_sharded if self.sharded else None)
                self.step = state.state["step"]
                self.counts = {k: state.state.get(k, 0) for k in COUNTS}
                if "trained_pairs" not in state.state:  # older checkpoints did not count it; their steps trained
                    self.counts["trained_pairs"] = self.step
                self.resume_rng = state.rng
                log.info("resumed from %s (step %d)", state.path, self.step)

        # 7. order of pairs (train.curriculum's easy-to-hard levels, or one shuffle of all), positioned after the
        # last completed optimizer step; with cached reference errors epochs repeat with the store's period
        self.pair_order = order_pairs(cfg, pairs, acc.process_index, acc.num_processes,
                                      start_micro_batch=self.step * cfg.train.gradient_accumulation)
        period = None if self.reference_store is None else self.reference_store.epochs
        self.loader = torch.utils.data.DataLoader(EpochItems(self.dataset, period), batch_sampler=self.pair_order,
                                                  collate_fn=pairs.collate, num_workers=cfg.data.num_workers)
        spans = -(-cfg.train.max_steps * cfg.train.gradient_accumulation // self.pair_order.per_epoch)
        if period is not None and spans > period:
            log.info("train.reference=cached: the run spans %d epochs, the stored reference errors %d: epoch e draws "
                     "the noise and timesteps of epoch e mod %d (docs/losses.md, Reference strategies)", spans, period,
                     period)
        return self

    def lora_rank(self) -> int:
        return self.accelerator.unwrap_model(self.unet).peft_config["default"].r

    def grow(self, rank: int) -> None:
        """train.curriculum.rank_schedule: raise the LoRA rank (output unchanged) between optimizer steps. A rank
        below the adapter's (a forced resume with another steps_per_level) keeps the adapter as it is."""
        if rank > self.lora_rank():
            self.params = self.ranks.grow(self.accelerator.unwrap_model(self.unet), self.optimizer, rank)

    def micro_step(self, raw: dict[str, Any]):
        batch = self.batch_encoder(raw)
        if batch is None:  # every pair of this micro-batch was corrupt: keep processes in step with a zero loss
            return self.empty_micro_step(raw)
        self.last_raw = raw
        if self.reference_store is not None:
            batch.ref_errors = self.reference_store.lookup(raw["epochs"], raw["indices"])
        with engine.autocast(self.accelerator):
            out = preference_step(self.unet, self.reference, self.loss_fn, self.family, self.noise_scheduler, batch,
                                  self.cfg.train.error_reduction)
        metrics = {"loss": out.loss.detach(), **out.metrics}
        return out.loss, metrics, batch.size

    def empty_micro_step(self, raw: dict[str, Any]):
        """A zero loss for a micro-batch of corrupt pairs only. DDP reduces its (zero) gradient like any other; FSDP2
        and DeepSpeed gather and reduce inside forward and backward, which every process must run together, so this
        process runs its last good micro-batch again, weighted 0."""
        if not self.sharded:
            return sum(p.sum() for p in self.params) * 0.0, {}, 0
        if self.last_raw is None:
            raise DataError(f"under {engine.name(self.accelerator)} process {self.accelerator.process_index}'s first "
                            f"micro-batch holds only corrupt pairs ({raw.get('num_skipped', 0)} skipped), so it cannot "
                            "take part in the step: fix the images, or prepare a cache (data.cache_dir), which drops "
                            "corrupt pairs before training")
        loss, _, _ = self.micro_step(self.last_raw)
        return loss * 0.0, {}, 0

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to train.max_steps; the main process also logs to output.dir/train.log. Ctrl-C / SIGTERM stop
        at the next step boundary with a checkpoint (TrainingInterrupted); a second one stops at once."""
        handler, self.bar = None, None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.out / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            if log.level == logging.NOTSET:  # the file gets INFO lines even when the caller set up no logging
                log.setLevel(logging.INFO)
        try:
            with StopSignals() as self.stop:
                return self._train()
        except KeyboardInterrupt:
            last = ckpt.latest(self.out / "checkpoints")
            where = f"rerun the same command to resume from {last}" if last else "no checkpoint yet, a rerun starts over"
            raise TrainingInterrupted(f"interrupted during step {self.step + 1}; {where}") from None
        finally:
            if self.bar is not None:
                self.bar.close()  # end the progress line before an error is printed after it
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
            self.run_dir.release()

    def _train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        ga = cfg.train.gradient_accumulation
        if self.is_main:
            self.run_dir.write_config(cfg)
            (self.out / "model_spec.json").write_text(json.dumps(spec_dict(self.spec), indent=2))
            ckpt.truncate_metrics(self.out / "metrics.jsonl", self.step)
            if self.report_to != "none":
                acc.init_trackers("diffusion-dpo", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                           for k, v in flatten(to_dict(cfg)).items()})
        from tqdm.auto import tqdm

        self.bar = bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=cfg.train.method, dynamic_ncols=True,
                              disable=not (self.is_main and self.progress))
        batches = iter(self.loader)
        if self.resume_rng is not None:
            ckpt.restore_rng(self.resume_rng)  # after iter(): see setup step 6
        t0 = time.perf_counter()
        start_step = self.step
        history: list[dict] = []
        while self.step < cfg.train.max_steps:
            if self.ranks is not None:
                self.grow(self.ranks.rank_at(self.step + 1))
            sums: dict[str, torch.Tensor] = {}
            pairs = skipped = 0
            for micro in range(ga):
                raw = next(batches)
                skipped += int(raw.get("num_skipped", 0))
                with engine.micro_batch(acc, self.unet, last=micro == ga - 1):
                    loss, metrics, n = self.micro_step(raw)
                    acc.backward(engine.backward_loss(acc, loss, ga))
                pairs += n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
            metrics = {k: v / ga for k, v in sums.items()}
            metrics = {k: acc.reduce(v.reshape(1).to(self.device), "mean").item() for k, v in sorted(metrics.items())}
            # one collective for the pair counts of all processes and a stop signal any of them caught
            totals = acc.reduce(torch.tensor([pairs, skipped, self.stop.received is not None], dtype=torch.float64,
                                             device=self.device), "sum").tolist()
            pairs, stop = int(totals[0]), totals[2] > 0
            self.counts["skipped_pairs"] += int(totals[1])
            if engine.is_deepspeed(acc):  # its engine clipped and stepped (or skipped) in the last backward
                grad_norm, outcome = engine.step_outcome(self.unet, self.lr_scheduler, metrics)
            else:
                grad_norm, outcome = apply_gradients(acc, self.optimizer, self.lr_scheduler, self.params,
                                                     cfg.train.max_grad_norm, metrics)
            if outcome == "nonfinite":
                if cfg.train.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {self.step + 1} (metrics {metrics}, grad norm {grad_norm}). "
                        "Lower train.learning_rate or train.beta, use bf16 instead of fp16, or set train.on_nonfinite=skip "
                        "to skip such steps (they are counted in metrics.jsonl)")
                self.counts["skipped_steps"] += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", self.step + 1,
                            self.counts["skipped_steps"])
            elif outcome == "overflow":
                self.counts["overflow_steps"] += 1
                log.warning("step %d: fp16 gradients overflowed, step skipped and loss scale lowered to %g (%d so far)",
                            self.step + 1, engine.loss_scale(acc, self.unet), self.counts["overflow_steps"])
            else:
                self.counts["trained_pairs"] += pairs
            self.step += 1
            record = {"step": self.step, **metrics, "grad_norm": grad_norm, "lr": self.lr_scheduler.get_last_lr()[0],
                      "pairs": pairs, **self.counts, **self.pair_order.log_fields((self.step - 1) * ga)}
            if engine.loss_scale(acc, self.unet) is not None:
                record["loss_scale"] = engine.loss_scale(acc, self.unet)
            if self.ranks is not None:
                record["lora_rank"] = self.lora_rank()
            history.append(record)
            if self.is_main:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.report_to != "none" and self.step % cfg.train.log_every == 0:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_acc", "grad_norm") if k in record})
                bar.update(1)
            self.check_something_trained(run_done=False)
            if stop and self.step < cfg.train.max_steps:
                self.save_checkpoint()
                last = ckpt.latest(self.out / "checkpoints")
                raise TrainingInterrupted(f"stopped by {self.stop.received or 'a signal'} after step {self.step}; "
                                          f"rerun the same command to resume from {last}")
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        acc.wait_for_everyone()
        self.check_something_trained(run_done=True)
        elapsed = time.perf_counter() - t0
        summary = self.save_outputs(history, elapsed, self.step - start_step)
        acc.wait_for_everyone()  # no process tears its process group down while another still writes or reduces
        acc.end_training()
        log.info("finished: %s", json.dumps(summary))
        return summary

    def check_something_trained(self, run_done: bool) -> None:
        """A run that trained no pair must fail, not report success; so must a whole pass over the data (every
        pair corrupt, say), unless fp16 overflows say the loss scale is still settling."""
        c = self.counts
        epoch_done = self.step * self.cfg.train.gradient_accumulation >= self.pair_order.per_epoch
        if c["trained_pairs"] > 0 or not (run_done or (epoch_done and c["overflow_steps"] == 0)):
            return
        message = (f"no pair was trained in {self.step} steps over {len(self.dataset)} pairs of "
                   f"{self.cfg.data.source}: "
                   f"{c['skipped_pairs']} pairs skipped as corrupt, {c['skipped_steps']} steps skipped as non-finite, "
                   f"{c['overflow_steps']} fp16 overflows (see {self.out / 'train.log'})")
        raise (DataError if c["skipped_pairs"] else NonFiniteLossError)(message)

    def save_checkpoint(self) -> None:
        acc, root = self.accelerator, self.out / "checkpoints"
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.unet)
        if self.sharded:  # every process writes its shard into the folder the main process prepared
            if self.is_main:
                ckpt.start(root, self.step)
            acc.wait_for_everyone()
            folder = ckpt.staging(root, self.step) / sharded_state.checkpoint_folder(acc)
            sharded_state.save_sharded(folder, self.unet, self.optimizer)
            acc.wait_for_everyone()
        if self.is_main:
            extra = self.counts if self.ranks is None else {**self.counts, "lora_rank": self.lora_rank()}
            ckpt.save(root, self.step, None if self.sharded else model, self.optimizer, self.lr_scheduler, self.cfg,
                      extra, self.cfg.train.checkpoints_total_limit, acc.scaler)
        acc.wait_for_everyone()

    def save_outputs(self, history: list[dict], elapsed: float, steps_run: int) -> dict[str, Any]:
        from diffusion_dpo.train.outputs import write_final_outputs

        summary = {"steps": self.step, "steps_this_run": steps_run, "seconds": round(elapsed, 2), **self.counts,
                   "engine": engine.name(self.accelerator), "processes": self.accelerator.num_processes}
        if self.ranks is not None:  # the model card says the rank grew, and when
            summary["lora_rank_schedule"] = self.ranks.describe()
        if history:
            last = history[-min(len(history), 10):]
            for key in ("loss", "implicit_acc"):
                if key in last[0]:
                    summary[f"{key}_last10"] = sum(r[key] for r in last) / len(last)
        model = self.accelerator.unwrap_model(self.unet)
        state = None
        if self.sharded:  # every process takes part in gathering the full tensors onto the main one
            state = sharded_state.consolidate(self.accelerator, self.unet, trainable_only=self.cfg.train.finetune == "lora")
        if self.is_main:
            write_final_outputs(self.out, model, self.cfg, self.family, summary, state)
        return summary


def train(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Python entry point: `diffusion_dpo.train.trainer.train(load_config(path, overrides))`."""
    try:
        trainer = Trainer(cfg, progress=progress).setup()
    except KeyboardInterrupt:  # loading large models can take minutes: Ctrl-C there is one line too
        last = ckpt.latest(Path(cfg.output.dir) / "checkpoints")
        raise TrainingInterrupted("interrupted while loading models and data; rerun the same command to "
                                  + (f"resume from {last}" if last else "start")) from None
    return trainer.train()
