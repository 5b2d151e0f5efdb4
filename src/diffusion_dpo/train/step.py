"""One preference training step on encoded pairs: the heart of Diffusion-DPO, kept free of I/O.

Used by the trainer, implicit-reward evaluation and the benchmark, so all compute the same thing:
`pair_errors` gives the named per-sample errors of policy and reference on shared noisy inputs,
`preference_step` feeds them to the loss.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffusion_dpo.losses import LossOutput, PairErrors
from diffusion_dpo.models.diffusion import per_sample_error, split_pairs, stack_pairs
from diffusion_dpo.train.batch import PairBatch
from diffusion_dpo.train.consistency import ConsistencyBatch, consistency_errors
from diffusion_dpo.train.singles import LabelledBatch, labelled_errors


def _stacked_inputs(family, scheduler, batch: PairBatch, device):
    """(2B, ...) winner rows first: the same noise, timestep and text for winner and loser of a pair. Returns the
    noisy inputs, timesteps and targets on `device` (default the batch's), the text and the pair conditioning."""
    latents, noise, t = stack_pairs(batch.latents_w, batch.latents_l, batch.noise, batch.timesteps)
    noisy, target = family.noisy_and_target(scheduler, latents, noise, t)
    device = latents.device if device is None else device
    return noisy.to(device), t.to(device), target.to(device), batch.cond.repeat_pairs(), batch.pair_cond


def reference_errors(reference, family, scheduler, batch: PairBatch, reduction: str = "mean",
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's per-sample errors of winners and losers, (B,) each: the forward `pair_errors` runs under
    train.reference=live, and what train.reference=cached stores once per pair and epoch (train.reference_cache)."""
    return _reference_forward(reference, family, _stacked_inputs(family, scheduler, batch, device), reduction)


def _reference_forward(reference, family, inputs, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    noisy, t, target, cond2, pair_cond = inputs
    ref_pred = reference(lambda net: family.predict(net, noisy, t, cond2, pair_cond), noisy.device)
    return split_pairs(per_sample_error(ref_pred, target, reduction, family.error_weight(t)))


def pair_errors(policy, reference, family, scheduler, batch: PairBatch, reduction: str = "mean",
                losers: bool = True, with_reference: bool = True, device=None) -> PairErrors:
    """Per-sample errors of B pairs under one noise and one timestep per pair.

    With losers: winner and loser rows are stacked (2B, ...) and the same noisy inputs go through the
    reference (no grad, when with_reference) and the policy. Without: only the winners go through the policy.
    The reference errors are read from the batch instead when it carries them (batch.ref_errors:
    train.reference=cached). `device`: where the networks run when the batch is noised elsewhere (implicit
    evaluation noises on the CPU, so its results do not depend on the device); default the batch's device."""
    if not losers:
        latents, noise, t = batch.latents_w, batch.noise, batch.timesteps
        pair_cond = None if batch.pair_cond is None else batch.pair_cond[: batch.size]
        noisy, target = family.noisy_and_target(scheduler, latents, noise, t)
        device = latents.device if device is None else device
        noisy, t, target = noisy.to(device), t.to(device), target.to(device)
        pred = family.predict(policy, noisy, t, batch.cond, pair_cond)
        return PairErrors(per_sample_error(pred, target, reduction, family.error_weight(t)))
    inputs = _stacked_inputs(family, scheduler, batch, device)
    noisy, t, target, cond2, pair_cond = inputs
    ref_w = ref_l = None
    if with_reference and batch.ref_errors is not None:  # computed before training, on these very inputs
        ref_w, ref_l = (e.to(noisy.device) for e in batch.ref_errors)
    elif with_reference:
        ref_w, ref_l = _reference_forward(reference, family, inputs, reduction)
    pred = family.predict(policy, noisy, t, cond2, pair_cond)
    policy_w, policy_l = split_pairs(per_sample_error(pred, target, reduction, family.error_weight(t)))
    pref_prob = None if batch.pref_prob is None else batch.pref_prob.to(noisy.device)  # loss.soft_labels
    return PairErrors(policy_w, policy_l, ref_w, ref_l, pref_prob)


def preference_step(policy, reference: Optional[object], loss_fn, family, scheduler,
                    batch: PairBatch | LabelledBatch | ConsistencyBatch,
                    reduction: str = "mean") -> LossOutput:
    """Forward pass(es) and loss for one micro-batch (DPO: reference and policy on 2B rows; SFT: policy on B;
    a LabelledBatch of single images: train.singles.labelled_errors, chosen by the batch's type)."""
    errors = ERRORS[type(batch)](policy, reference, family, scheduler, batch, reduction, losers=loss_fn.needs_losers,
                                 with_reference=loss_fn.needs_reference)
    return loss_fn(errors)


ERRORS = {PairBatch: pair_errors, LabelledBatch: labelled_errors, ConsistencyBatch: consistency_errors}
"""Batch type -> its per-sample errors (the encoder chosen in setup decides the type, so the trainer never branches;
consistency_dpo's distances: train.consistency)."""
