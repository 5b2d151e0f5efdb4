"""Pairing invariants: shared noise/timestep/text, identical policy and reference inputs, an
adapter-off reference equal to the base model bit for bit, ln 2 at initialisation."""

import math

import pytest
import torch

from diffusion_dpo.losses import DPOLoss
from diffusion_dpo.models.diffusion import draw_pair_randomness, pair_generator, prediction_target, stack_pairs
from diffusion_dpo.models.families import SDFamily, detect_spec, family_of
from diffusion_dpo.models.loading import load_noise_scheduler, load_unet
from diffusion_dpo.models.lora import add_lora
from diffusion_dpo.models.reference import Reference, reference_mode
from diffusion_dpo.train.batch import PairBatch
from diffusion_dpo.train.step import preference_step


def pair_noisy_inputs(scheduler, latents_w, latents_l, noise, timesteps):
    """What the step does to B pairs: stack_pairs, then the SD family's DDPM noising and target (2B rows)."""
    latents, noise2, t2 = stack_pairs(latents_w, latents_l, noise, timesteps)
    noisy, target = SDFamily(spec=None).noisy_and_target(scheduler, latents, noise2, t2)  # DDPM maths: no spec needed
    return noisy, t2, target


def _batch(spec, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 4, 16, 16)
    enc = family_of(spec).prompt_encoder()
    cond = enc(["a red circle", "a blue square", "a small dog"][:b])
    rnd = draw_pair_randomness([pair_generator(0, 0, i) for i in range(b)], shape[1:], 0, 1000, 0.0)
    time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * (2 * b), dtype=torch.float) if spec.family == "sdxl" else None
    return PairBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g), cond, rnd["noise"],
                     rnd["timesteps"], time_ids)


def test_winner_and_loser_share_noise_and_timestep(tiny_sd):
    spec = detect_spec(str(tiny_sd))
    sched = load_noise_scheduler(spec)
    b = 3
    lw, ll, noise = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    noisy, t2, target = pair_noisy_inputs(sched, lw, ll, noise, t)
    assert torch.equal(t2[:b], t2[b:]) and torch.equal(t2[:b], t)
    assert torch.equal(target[:b], target[b:])  # epsilon target: the shared noise
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(noisy[:b], a * lw + s * noise, atol=1e-6)
    assert torch.allclose(noisy[b:], a * ll + s * noise, atol=1e-6)


def test_v_prediction_target_is_the_velocity_by_hand():
    from diffusers import DDPMScheduler

    # betas chosen so that alphas_cumprod = (0.64, 0.36): t=0 has (sqrt a, sqrt(1-a)) = (0.8, 0.6), t=1 (0.6, 0.8)
    betas = [0.36, 1 - 0.36 / 0.64]
    x0 = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]).view(2, 1, 1, 2)
    noise = torch.tensor([[3.0, -1.0], [2.0, 1.0]]).view(2, 1, 1, 2)
    t = torch.tensor([0, 1])
    v_sched = DDPMScheduler(num_train_timesteps=2, trained_betas=betas, prediction_type="v_prediction")
    # v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (Salimans & Ho 2022):
    # row 0: 0.8 * (3, -1) - 0.6 * (1, 2) = (1.8, -2.0); row 1: 0.6 * (2, 1) - 0.8 * (-1, 0.5) = (2.0, 0.2)
    expected = torch.tensor([[1.8, -2.0], [2.0, 0.2]]).view(2, 1, 1, 2)
    assert torch.allclose(prediction_target(v_sched, x0, noise, t), expected, atol=1e-6)
    eps_sched = DDPMScheduler(num_train_timesteps=2, trained_betas=betas, prediction_type="epsilon")
    assert torch.equal(prediction_target(eps_sched, x0, noise, t), noise)
    # paired: winner (row 0 of x0) and loser (row 1 of x0) at one shared noise and timestep t=0
    _, _, target = pair_noisy_inputs(v_sched, x0[:1], x0[1:], noise[:1], t[:1])
    assert torch.allclose(target, torch.stack([0.8 * noise[0] - 0.6 * x0[0], 0.8 * noise[0] - 0.6 * x0[1]]), atol=1e-6)


def test_v_prediction_model_error_is_measured_against_the_velocity(tiny_sd_v):
    spec = detect_spec(str(tiny_sd_v))
    sched = load_noise_scheduler(spec)
    assert sched.config.prediction_type == "v_prediction"
    unet = load_unet(spec).eval()
    family = family_of(spec)
    batch = _batch(spec)
    with torch.no_grad():
        out = preference_step(unet, Reference(load_unet(spec).eval(), lora=False), DPOLoss(5000), family, sched, batch)
        # independently: noisy input and velocity from alphas_cumprod, one noise and timestep per pair
        t = batch.timesteps
        a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        errors = {}
        for side, x0 in (("w", batch.latents_w), ("l", batch.latents_l)):
            pred = family.predict(unet, a * x0 + s * batch.noise, t, batch.cond, None).float()
            errors[side] = {"v": (pred - (a * batch.noise - s * x0)).pow(2).mean(dim=(1, 2, 3)),
                            "eps": (pred - batch.noise).pow(2).mean(dim=(1, 2, 3))}
    for side in ("w", "l"):
        assert out.metrics[f"err_policy_{side}"].item() == pytest.approx(errors[side]["v"].mean().item(), rel=1e-4)
        # the noise target would give a clearly different error: the check above can tell them apart
        assert errors[side]["eps"].mean().item() != pytest.approx(errors[side]["v"].mean().item(), rel=1e-2)


def test_pair_randomness_depends_only_on_the_pair():
    shape = (4, 8, 8)
    one = draw_pair_randomness([pair_generator(3, 1, 7)], shape, 0, 1000, 0.2)
    many = draw_pair_randomness([pair_generator(3, 1, i) for i in (5, 7, 9)], shape, 0, 1000, 0.2)
    for key in one:
        assert torch.equal(one[key][0], many[key][1])
    other_epoch = draw_pair_randomness([pair_generator(3, 2, 7)], shape, 0, 1000, 0.2)
    assert not torch.equal(one["noise"], other_epoch["noise"])


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v", "tiny_sdxl", "tiny_lcm"])
def test_policy_and_reference_see_identical_inputs_and_start_at_ln2(fixture, request):
    spec = detect_spec(str(request.getfixturevalue(fixture)))
    sched = load_noise_scheduler(spec)
    unet = load_unet(spec)
    add_lora(unet, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_v"])
    seen = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    out = preference_step(unet, Reference(unet, lora=True), DPOLoss(5000), family_of(spec, 8.0), sched, _batch(spec))
    hook.remove()
    assert len(seen) == 2  # reference, then policy
    (args_r, kw_r), (args_p, kw_p) = seen
    for x, y in zip(args_r, args_p):
        assert torch.equal(x, y)
    assert kw_r.keys() == kw_p.keys()
    for k in kw_r:
        if isinstance(kw_r[k], torch.Tensor):
            assert torch.equal(kw_r[k], kw_p[k]), k
        elif isinstance(kw_r[k], dict):
            for kk in kw_r[k]:
                assert torch.equal(kw_r[k][kk], kw_p[k][kk]), kk
    b = 3
    text = kw_p["encoder_hidden_states"]
    assert torch.equal(text[:b], text[b:])  # one text embedding per pair
    assert spec.prediction_type == ("v_prediction" if fixture == "tiny_sd_v" else "epsilon")
    if spec.family == "lcm":
        assert kw_p["timestep_cond"] is not None
    if spec.family == "sdxl":
        assert kw_p["added_cond_kwargs"]["text_embeds"].shape[0] == 2 * b
    # LoRA B matrices start at zero: policy == reference, loss is exactly ln 2
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_adapter_off_reference_equals_base_bit_for_bit(tiny_sd):
    spec = detect_spec(str(tiny_sd))
    base = load_unet(spec).eval()
    unet = load_unet(spec).eval()
    add_lora(unet, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
             init_weights="gaussian")
    with torch.no_grad():  # make the adapter matter
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x, t, h = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = base(x, t, h).sample
        with reference_mode(unet):
            off = unet(x, t, h).sample
        on = unet(x, t, h).sample
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref)
