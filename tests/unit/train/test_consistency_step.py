"""train.consistency: Consistency-DPO's batches and distances on the tiny LCM (student, adapter-off reference) with
the tiny SD pipeline as teacher: ln 2 at initialisation, winner and loser sharing step / noise / w, and no gradient
into the reference, the teacher or the target."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.losses import build_loss
from diffusion_dpo.models.families import detect_spec, family_of
from diffusion_dpo.models.lora import add_lora
from diffusion_dpo.models.reference import Reference
from diffusion_dpo.train.batch import PixelEncoder
from diffusion_dpo.train.consistency import ConsistencyBatch, ConsistencyEncoder, draw_guidance
from diffusion_dpo.train.step import preference_step


def _setup(tiny_lcm, tiny_sd, *extra):
    cfg = load_config(None, [f"model.pretrained={tiny_lcm}", f"model.teacher={tiny_sd}", "data.resolution=32",
                             "train.method=consistency_dpo", "train.beta=400", *extra])
    family = family_of(detect_spec(str(tiny_lcm)))
    encoder = ConsistencyEncoder(PixelEncoder(cfg, family, "cpu"), cfg, family, "cpu")
    return cfg, family, encoder


def _raw(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand((b, 2, 3, 32, 32), generator=g) * 2 - 1,
            "prompts": ["a red circle", "a blue square", "a small dog", "a green cat"][:b],
            "original_size": torch.full((b, 2, 2), 32), "crop_top_left": torch.zeros((b, 2, 2), dtype=torch.long),
            "indices": torch.arange(b), "epochs": torch.zeros(b, dtype=torch.long)}


@pytest.fixture(scope="module")
def lcm_setup(tiny_lcm, tiny_sd):
    cfg, family, encoder = _setup(tiny_lcm, tiny_sd)
    unet = family.load_network()
    add_lora(unet, 4, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"])
    return cfg, family, encoder, unet


def test_winner_and_loser_share_step_noise_and_guidance(lcm_setup):
    cfg, family, encoder, _ = lcm_setup
    raw, b = _raw(), 3
    batch = encoder(raw)
    assert isinstance(batch, ConsistencyBatch) and batch.size == b
    assert torch.equal(batch.start[:b], batch.start[b:]) and torch.equal(batch.prev[:b], batch.prev[b:])
    assert torch.equal(batch.guidance[:b], batch.guidance[b:])
    assert torch.equal(batch.start - batch.prev, torch.where(batch.start == 19, 19, 20))  # one solver step of skip 20
    assert ((batch.guidance >= 6.0) & (batch.guidance <= 16.0)).all()  # w in [5, 15], the pipeline's scale w + 1
    # the shared noise: x_s(w) - x_s(l) = sqrt(a_s) (x0_w - x0_l), with the clean latents the inner encoder gives
    pair = encoder.inner(raw)
    a = encoder.scheduler.alphas_cumprod[batch.start[:b]].sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(batch.noisy[:b] - batch.noisy[b:], a * (pair.latents_w - pair.latents_l), atol=1e-5)
    s = (1 - encoder.scheduler.alphas_cumprod[batch.start[:b]]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(batch.noisy[:b], a * pair.latents_w + s * pair.noise, atol=1e-5)
    # the solver index is the pair's own timestep draw // 20
    assert torch.equal(batch.start[:b], (pair.timesteps // 20 + 1) * 20 - 1)


def test_guidance_draws_are_per_pair_whatever_the_batch():
    both = draw_guidance(0, torch.tensor([0, 0]), torch.tensor([4, 7]), 5.0, 15.0)
    alone = draw_guidance(0, torch.tensor([0]), torch.tensor([7]), 5.0, 15.0)
    assert both[1] == alone[0] and both[0] != both[1]
    assert draw_guidance(0, torch.tensor([1]), torch.tensor([7]), 5.0, 15.0)[0] != alone[0]  # a new epoch, a new w


def test_ln2_at_initialisation(lcm_setup):
    cfg, family, encoder, unet = lcm_setup
    loss_fn = build_loss(cfg.train.method, cfg.train.beta, cfg.loss)
    out = preference_step(unet, Reference(unet, lora=True), loss_fn, family, encoder.scheduler, encoder(_raw()))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(out.metrics["inside"], torch.tensor(0.0))  # every logit 0: student == reference
    assert out.metrics["err_policy_w"].item() > 0  # a real distance (the teacher step moved the target)


def test_reference_teacher_and_target_get_no_gradient(lcm_setup):
    cfg, family, encoder, unet = lcm_setup
    for p in unet.parameters():
        p.grad = None
    batch = encoder(_raw(2))
    assert not batch.teacher_prev.requires_grad and not batch.noisy.requires_grad
    from diffusion_dpo.train.consistency import consistency_errors

    errors = consistency_errors(unet, Reference(unet, lora=True), family, encoder.scheduler, batch)
    assert errors.policy_w.requires_grad and errors.policy_l.requires_grad
    assert not errors.ref_w.requires_grad and not errors.ref_l.requires_grad  # reference forward under no_grad
    (errors.policy_w.sum() + errors.policy_l.sum()).backward()
    lora = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)  # the reference's weights
    assert all(p.grad is None and not p.requires_grad for p in encoder.teacher.parameters())
