"""One preference training step on encoded pairs: the heart of Diffusion-DPO, kept free of I/O.

Used by the trainer, the benchmark and implicit-reward evaluation, so all three compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from diffusion_dpo.losses.dpo import LossOutput
from diffusion_dpo.models.diffusion import pair_noisy_inputs, per_sample_error, prediction_target
from diffusion_dpo.models.encode import TextConditioning, guidance_embedding


@dataclass
class PairBatch:
    """B encoded preference pairs. Winner first everywhere a pair is stacked."""

    latents_w: torch.Tensor  # (B, C, h, w), already times the VAE scaling factor
    latents_l: torch.Tensor  # (B, C, h, w)
    cond: TextConditioning  # (B, L, D) [+ pooled (B, D2)]: one text conditioning per pair
    noise: torch.Tensor  # (B, C, h, w): one noise per pair
    timesteps: torch.Tensor  # (B,): one timestep per pair
    time_ids: Optional[torch.Tensor] = None  # SDXL (2B, 6) float32, winner rows then loser rows: pair_time_ids

    @property
    def size(self) -> int:
        return self.latents_w.shape[0]


@dataclass
class UNetCaller:
    """Calls a UNet with the conditioning its family needs."""

    family: str
    lcm_guidance_scale: float = 8.0
    time_cond_proj_dim: Optional[int] = None

    def __call__(self, unet, noisy: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                 time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype  # works for DDP-wrapped networks too (no .dtype there)
        added = None
        if self.family == "sdxl":
            # Time ids stay float32: the UNet's sinusoidal projection computes in float32 anyway, and a cast to
            # a bf16 network's dtype rounds sizes above 256 (683 -> 684), differently for a policy and a
            # reference of different dtypes, which would then see different conditioning.
            added = {"text_embeds": cond.pooled_prompt_embeds.to(dtype), "time_ids": time_ids.float()}
        timestep_cond = None
        if self.time_cond_proj_dim is not None:  # latent consistency UNet: guidance-scale embedding
            w = torch.full((noisy.shape[0],), self.lcm_guidance_scale, device=noisy.device)
            timestep_cond = guidance_embedding(w, self.time_cond_proj_dim).to(noisy.device, dtype)
        return unet(noisy.to(dtype), t, encoder_hidden_states=cond.prompt_embeds.to(dtype), added_cond_kwargs=added,
                    timestep_cond=timestep_cond, return_dict=False)[0]


def preference_step(unet, reference, loss_fn, scheduler, batch: PairBatch, call: UNetCaller,
                    reduction: str = "mean") -> LossOutput:
    """Forward pass(es) and loss for one micro-batch.

    DPO: the same noisy inputs (2B rows) go through the reference (no grad) and the policy.
    SFT: only the winners go through the policy."""
    device = batch.latents_w.device
    if not loss_fn.needs_losers:
        t = batch.timesteps
        noisy = scheduler.add_noise(batch.latents_w, batch.noise, t)
        target = prediction_target(scheduler, batch.latents_w, batch.noise, t)
        time_ids = None if batch.time_ids is None else batch.time_ids[: batch.size]
        pred = call(unet, noisy, t, batch.cond, time_ids)
        return loss_fn(per_sample_error(pred, target, reduction))

    noisy, t2, target = pair_noisy_inputs(scheduler, batch.latents_w, batch.latents_l, batch.noise, batch.timesteps)
    cond2 = batch.cond.repeat_pairs()  # (2B, ...): the same text for winner and loser
    ref_pred = reference(lambda net: call(net, noisy, t2, cond2, batch.time_ids), device)
    err_ref = per_sample_error(ref_pred, target, reduction)
    pred = call(unet, noisy, t2, cond2, batch.time_ids)
    err_policy = per_sample_error(pred, target, reduction)
    return loss_fn(err_policy, err_ref)
