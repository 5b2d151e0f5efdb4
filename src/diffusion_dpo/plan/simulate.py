"""Two training steps of a config, simulated on fake tensors: live bytes op by op, and the step's FLOPs.

The networks are the real classes built from the model's real configs on the meta device (plan.model), set up
as the trainer sets them up (train/trainer.py `setup`, step 4: LoRA on a base cast to model.frozen_dtype, or a
full fp32 network and a frozen reference copy in model.reference_dtype; gradient checkpointing; lean autograd),
and stepped as the trainer steps them: the frozen VAE and text encoders encode 2B images and B prompts when
no cache is read; the reference (adapters off, or the copy) runs the 2B stacked rows without gradients, the
policy runs them with gradients; the loss is the configured one (losses.build_loss), then backward, gradient
clipping, the optimizer (train.optim.build_optimizer) and zero_grad(set_to_none). Two steps, because the
optimizer's state exists from the first step on and the second step's peak is the one every later step
repeats (a third step counts the FLOPs).

Not simulated: the optimizer of train.optimizer=adamw8bit (bitsandbytes runs on CUDA only): the step runs
AdamW and its state is scaled to 8-bit's 2 bytes + 1 fp32 scale per 256 values per parameter (0.254 of
AdamW's 8 bytes), its temporaries likewise (bitsandbytes updates in one fused kernel).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_dpo.plan.model import ModelDesc, build_encoders, build_network, network_inputs
from diffusion_dpo.plan.tracker import LiveBytes, fake_module, tensor_bytes

EIGHT_BIT_STATE = (2 + 2 * 4 / 256) / 8
"""AdamW8bit's state per parameter over AdamW's: two 8-bit moments plus one fp32 absmax per 256-value block
of each, against two fp32 moments."""


@dataclass
class StepProfile:
    """What one device holds in a training step of the config, as one process without sharding sees it."""

    weights: dict[str, int]
    """Bytes of the weights on the device: policy_trainable, policy_frozen (LoRA's base; a full fine-tune has
    none), reference (the frozen copy of full fine-tuning; 0 for LoRA, cached or no reference, or on the CPU),
    encoders (VAE + text encoders when the step encodes on the fly; 0 with a cache)."""
    timeline: list[tuple[int, int, int]]
    """(activations and temporaries, gradients, optimizer state) in bytes after each op of the two steps."""
    peak: int
    """Peak bytes: the weights plus the timeline's largest total."""
    flops: float
    """FLOPs of one step as it runs (gradient checkpointing's recomputation included)."""
    parameters: dict[str, int]
    """Counts: network, trainable, reference, encoders."""
    largest_unit: int
    """Bytes of the largest block (the unit FSDP / ZeRO-3 gathers whole), in the trainable weights' dtype."""

    def at_peak(self) -> dict[str, int]:
        """The peak's parts: the weights and the (activations, gradients, optimizer) of the peak moment."""
        act, grad, opt = max(self.timeline, key=sum)
        return {**self.weights, "gradients": grad, "optimizer": opt, "activations": act}


def on_the_fly(cfg) -> bool:
    """Whether training encodes images and prompts in the step (VAE and text encoders loaded), as
    train.batch.open_pairs decides: not when data.source is a prepared cache or data.cache_dir is set."""
    from pathlib import Path

    d = cfg.data
    prepared = d.format == "cache" or (d.format == "auto" and Path(d.source, "cache_manifest.json").is_file())
    return not (prepared or d.cache_dir)


def simulate(cfg, desc: ModelDesc, resolution: int) -> StepProfile:
    """Simulate two training steps of `cfg` (a config.RunConfig) on the model `desc` at `resolution` pixels."""
    from diffusers.utils import logging as diffusers_logging
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion_dpo.config import reference_strategy
    from diffusion_dpo.losses import build_loss
    from diffusion_dpo.models.families import lora_targets_of_network
    from diffusion_dpo.runtime import torch_dtype
    from diffusion_dpo.train.optim import build_optimizer

    cfg = cfg.with_network_defaults(lora_targets_of_network(desc.network_class))  # lora.target_modules as train's
    m, t = cfg.model, cfg.train
    frozen = torch_dtype(m.frozen_dtype, "model.frozen_dtype")
    lora = t.finetune == "lora"
    live = reference_strategy(t) == "live"
    loss_fn = build_loss(t.method, t.beta, cfg.loss)
    # 1. the networks, on the meta device, as Trainer.setup makes them (diffusers warns about every .to(dtype)
    # of a model without "keep in fp32" modules: nothing to act on here)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    with torch.device("meta"):
        net = build_network(desc)
        if lora:
            from diffusion_dpo.models.lora import add_lora

            net.to(frozen)
            add_lora(net, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.init_weights)
        ref = None
        if live and not lora:
            ref = copy.deepcopy(net).requires_grad_(False).eval().to(torch_dtype(m.reference_dtype or m.frozen_dtype))
        vae, encoders = build_encoders(desc, frozen) if on_the_fly(cfg) else (None, [])
    diffusers_logging.set_verbosity(verbosity)
    fm = FakeTensorMode()
    for module in (net, ref, vae, *(e for e, _ in encoders)):
        if module is not None:
            fake_module(module, fm)
    largest = _largest_unit(net)
    weights = {"policy_trainable": tensor_bytes(net, trainable=True), "policy_frozen": tensor_bytes(net, trainable=False),
               "reference": 0 if ref is None or m.reference_on_cpu else tensor_bytes(ref),
               "encoders": sum(tensor_bytes(x) for x in (vae, *(e for e, _ in encoders)) if x is not None)}
    weights["policy_frozen"] += sum(b.numel() * b.element_size() for b in net.buffers())
    tracker = LiveBytes()
    with fm:
        for module in (net, vae, *(e for e, _ in encoders)) + (() if ref is None or m.reference_on_cpu else (ref,)):
            if module is not None:
                for x in (*module.parameters(), *module.buffers()):
                    tracker.record(x, "static")
        net.train()
        if t.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        if t.lean_autograd:
            from diffusion_dpo.models import lean_autograd

            lean_autograd.apply(net)
        params = [p for p in net.parameters() if p.requires_grad]
        for p in params:  # a gradient is born as a backward op's output: count it as a gradient once it is one
            p.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "grad"))
        # adamw8bit: AdamW stands in (bitsandbytes needs CUDA); its state is scaled below
        opt = build_optimizer(_with_optimizer(t, "adamw" if t.optimizer == "adamw8bit" else t.optimizer), params,
                              t.learning_rate)
        step = _Step(cfg, desc, net, ref, vae, encoders, loss_fn, live, frozen, resolution, tracker)
        with tracker:
            step(opt)
            step(opt)
        # FLOPs in a third step, uncounted: FlopCounterMode's module hooks keep tensors alive (under gradient
        # checkpointing, 4 MB more than the real step on the tiny UNet)
        counter = FlopCounterMode(display=False)
        with counter:
            step(opt)
    timeline = tracker.timeline
    if t.optimizer == "adamw8bit":
        timeline = [(a, g, int(o * EIGHT_BIT_STATE)) for a, g, o in timeline]
    static = sum(weights.values())
    return StepProfile(
        weights=weights, timeline=timeline, peak=static + max(sum(p) for p in timeline),
        flops=float(counter.get_total_flops()), largest_unit=largest,
        parameters={"network": sum(p.numel() for p in net.parameters()), "trainable": sum(p.numel() for p in params),
                    "reference": 0 if ref is None else sum(p.numel() for p in ref.parameters()),
                    "encoders": sum(p.numel() for x in (vae, *(e for e, _ in encoders)) if x is not None
                                    for p in x.parameters())})


def _with_optimizer(train, name: str):
    import dataclasses

    return dataclasses.replace(train, optimizer=name)


def _largest_unit(net: torch.nn.Module) -> int:
    """Bytes of the largest innermost block (ResnetBlock2D, BasicTransformerBlock, JointTransformerBlock,
    FluxTransformerBlock, ...): what a block-wise FSDP / ZeRO-3 wrap gathers at once; trainable weights' dtype."""
    blocks = [mod for mod in net.modules() if type(mod).__name__.endswith(("Block", "Block2D"))]
    inner = [b for b in blocks if not any(c is not b and c in blocks for c in b.modules())]
    if not inner:
        return tensor_bytes(net)
    unit = max(inner, key=lambda b: sum(p.numel() for p in b.parameters()))
    return sum(p.numel() for p in unit.parameters()) * 4  # the trained copy is fp32 (LoRA's gathered base: less)


class _Step:
    """One training step on fake tensors (Trainer.micro_step + backward + train.optim.apply_gradients)."""

    def __init__(self, cfg, desc, net, ref, vae, encoders, loss_fn, live: bool, frozen, resolution: int,
                 tracker: LiveBytes):
        self.cfg, self.desc, self.net, self.ref, self.vae, self.encoders = cfg, desc, net, ref, vae, encoders
        self.loss_fn, self.live, self.frozen, self.resolution, self.tracker = loss_fn, live, frozen, resolution, tracker

    def __call__(self, opt) -> None:
        from diffusion_dpo.losses import PairErrors
        from diffusion_dpo.models.diffusion import per_sample_error, split_pairs
        from diffusion_dpo.models.reference import reference_mode

        cfg, b = self.cfg, self.cfg.train.batch_size
        rows = 2 * b if self.loss_fn.needs_losers else b
        c, h, w = self.desc.latent_shape(self.resolution)
        with torch.no_grad():
            if self.vae is not None:  # PixelEncoder: both images of each pair through the VAE, the prompts once
                pixels = torch.randn(2 * b, 3, self.resolution, self.resolution, dtype=self.frozen)
                latents = self.vae.encode(pixels).latent_dist.sample()[:rows].float()
                for encoder, tokens in self.encoders:
                    encoder(torch.zeros(b, tokens, dtype=torch.long), output_hidden_states=True)
            else:  # CachedEncoder: stored float16 means and stds of both images
                mean = torch.randn(b, 2, c, h, w, dtype=torch.float16)
                latents = (mean.float() + mean.float() * torch.randn(b, 2, c, h, w)).transpose(0, 1).flatten(0, 1)[:rows]
            noise = torch.randn(rows, c, h, w)
            target = noise - latents
        autocast = torch.autocast("cpu", dtype=torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float16,
                                  enabled=cfg.train.mixed_precision != "no")
        with autocast:
            errors: dict[str, Any] = {}
            if self.live and self.loss_fn.needs_reference:
                with torch.no_grad():
                    if self.ref is None:  # LoRA: the policy with adapters off
                        with reference_mode(self.net):
                            pred = self.net(**network_inputs(self.desc, self.net, rows, latents + noise))[0]
                    else:
                        held = tensor_bytes(self.ref) if cfg.model.reference_on_cpu else 0
                        with self.tracker.holding(held):
                            pred = self.ref(**network_inputs(self.desc, self.ref, rows, latents + noise))[0]
                    err = per_sample_error(pred, target.reshape(pred.shape), cfg.train.error_reduction)
                    errors["ref_w"], errors["ref_l"] = split_pairs(err) if rows == 2 * b else (err, None)
                    del pred
            pred = self.net(**network_inputs(self.desc, self.net, rows, latents + noise))[0]
            err = per_sample_error(pred, target.reshape(pred.shape), cfg.train.error_reduction)
            errors["policy_w"], errors["policy_l"] = split_pairs(err) if rows == 2 * b else (err, None)
            loss = self.loss_fn(PairErrors(**errors)).loss
        loss.backward()
        if cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], cfg.train.max_grad_norm)
        self.tracker.category = "opt"
        opt.step()
        self.tracker.category = "act"
        opt.zero_grad(set_to_none=True)
