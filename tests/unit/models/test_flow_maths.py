"""models/flow.py and what the flow families hand the transformer: the velocity target and sigma sampling
checked against hand-computed values and against diffusers' own helpers (the training scripts' schemes, the
scheduler's table and shifts, the Flux pipeline's packing and ids), conditioning as the stock pipelines' encode_prompt,
policy and reference fed identical inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.flow_config import FlowConfig
from diffusion_dpo.models.encode import TextConditioning, scale_latents
from diffusion_dpo.models.families import detect_spec, family_of
from diffusion_dpo.models.families.flux import latent_image_ids, pack_latents, unpack_latents
from diffusion_dpo.models.flow import (FlowSchedule, draw_u, loss_weight, noisy_and_velocity, resolution_mu, sigma_of_u,
                                       sigma_sampler, static_shift, time_shift)

SD3_SCHEDULE = FlowSchedule(shift=3.0)
FLUX_SCHEDULE = FlowSchedule(shift=3.0, use_dynamic_shifting=True)


def test_noisy_input_and_velocity_target_by_hand():
    x0, noise = torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), -1.0)
    noisy, target = noisy_and_velocity(x0, noise, torch.tensor(0.25).view(1, 1, 1, 1))
    assert torch.equal(noisy, torch.full_like(x0, 0.75 * 2.0 + 0.25 * -1.0))  # 1.25
    assert torch.equal(target, torch.full_like(x0, -3.0))  # noise - x0
    # sigma 0: the clean latent; sigma 1: pure noise
    assert torch.equal(noisy_and_velocity(x0, noise, torch.zeros(1, 1, 1, 1))[0], x0)
    assert torch.equal(noisy_and_velocity(x0, noise, torch.ones(1, 1, 1, 1))[0], noise)


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_family_target_reads_sigma_from_the_timestep_input(fixture, request):
    family = family_of(detect_spec(str(request.getfixturevalue(fixture))))
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    noisy, target = family.noisy_and_target(None, x0, noise, torch.tensor([250.0, 900.0]))  # sigma 0.25, 0.9
    torch.testing.assert_close(noisy[0], 0.75 * x0[0] + 0.25 * noise[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(noisy[1], 0.1 * x0[1] + 0.9 * noise[1], rtol=0, atol=1e-6)
    assert torch.equal(target, noise - x0)


def test_shifts_by_hand():
    half = torch.tensor(0.5)
    assert static_shift(half, 3.0).item() == pytest.approx(1.5 / 2.0)  # 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert static_shift(half, 1.0).item() == 0.5
    assert time_shift(half, math.log(3.0)).item() == pytest.approx(0.75)  # exp(mu) = 3: the static shift 3
    # calculate_shift: 0.5 at 256 tokens, 1.15 at 4096, linear between (and beyond)
    assert resolution_mu(256, FLUX_SCHEDULE) == pytest.approx(0.5)
    assert resolution_mu(4096, FLUX_SCHEDULE) == pytest.approx(1.15)
    assert resolution_mu(64, FLUX_SCHEDULE) == pytest.approx(0.5 - 192 * 0.65 / 3840)  # the tiny 8x8 tokens


def test_shifts_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.tensor([0.0, 0.1234, 0.5, 0.8, 0.99999])
    ours = sigma_of_u(u, SD3_SCHEDULE, 3.0, None) * 1000
    # the training scripts: indices = (u * N).long(); timesteps = scheduler.timesteps[indices]
    torch.testing.assert_close(ours, sched.timesteps[(u * 1000).long()], rtol=1e-6, atol=1e-4)
    assert sigma_of_u(torch.tensor([1.0]), SD3_SCHEDULE, 1.0, None).item() == pytest.approx(0.001)  # u=1: last level
    for seq in (64, 1024, 4096):
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert resolution_mu(seq, FLUX_SCHEDULE) == pytest.approx(mu)
        s = torch.tensor([0.2, 0.5, 0.9])
        torch.testing.assert_close(time_shift(s, mu), sched.time_shift(mu, 1.0, s))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_each_weighting_scheme_draws_as_diffusers_and_by_hand(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = draw_u(torch.Generator().manual_seed(7), scheme, 0.3, 0.8, 1.29)
    theirs = compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.3, logit_std=0.8, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)
    g = torch.Generator().manual_seed(7)
    if scheme == "logit_normal":  # sigmoid of N(0.3, 0.8)
        z = 0.3 + 0.8 * torch.randn(1, generator=g)
        assert ours.item() == pytest.approx(1 / (1 + math.exp(-z.item())), rel=1e-5)
    else:
        r = torch.rand(1, generator=g).item()
        expected = r if scheme == "uniform" else 1 - r - 1.29 * (math.cos(math.pi * r / 2) ** 2 - 1 + r)
        assert ours.item() == pytest.approx(expected, rel=1e-6)


def test_sigma_sampler_applies_the_scheduler_shift_or_the_resolution_shift():
    uniform = FlowConfig(weighting_scheme="uniform")
    r = torch.rand(1, generator=torch.Generator().manual_seed(3)).item()
    base = (1000 - math.floor(r * 1000)) / 1000
    sd3 = sigma_sampler(uniform, SD3_SCHEDULE, 64)(torch.Generator().manual_seed(3)).item()
    assert sd3 == pytest.approx(1000 * 3 * base / (1 + 2 * base), rel=1e-6)  # SD3: the scheduler's shift 3
    mu = 0.5 - 192 * 0.65 / 3840
    flux = sigma_sampler(uniform, FLUX_SCHEDULE, 64)(torch.Generator().manual_seed(3)).item()
    assert flux == pytest.approx(1000 * math.exp(mu) / (math.exp(mu) + 1 / base - 1), rel=1e-6)  # Flux: by resolution
    plain = FlowConfig(weighting_scheme="uniform", shift=1.0, resolution_shift=False)  # diffusers' Flux script
    assert sigma_sampler(plain, FLUX_SCHEDULE, 64)(torch.Generator().manual_seed(3)).item() == pytest.approx(1000 * base)
    forced = FlowConfig(weighting_scheme="uniform", resolution_shift=True)
    assert sigma_sampler(forced, SD3_SCHEDULE, 4096)(torch.Generator().manual_seed(3)).item() == pytest.approx(
        1000 * math.exp(1.15) / (math.exp(1.15) + 1 / base - 1), rel=1e-6)


def test_loss_weightings_by_hand():
    s = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    assert torch.allclose(loss_weight("sigma_sqrt", s), torch.tensor([4.0, 16.0]))
    assert torch.allclose(loss_weight("cosmap", s), torch.tensor([2 / (math.pi * 0.5), 2 / (math.pi * 0.625)]))
    assert loss_weight("none", s) is None


def test_scale_latents_applies_shift_then_scale():
    spec = SimpleNamespace(vae_shift_factor=0.1159, vae_scaling_factor=0.3611)  # FLUX.1's VAE
    assert scale_latents(torch.tensor([1.0]), spec).item() == pytest.approx((1.0 - 0.1159) * 0.3611)


@pytest.mark.fault(input="`flow.logit_std`, `flow.shift`, `flow.mode_scale` or `flow.guidance` out of range",
                   behaviour="ConfigError naming the key and the allowed range")
@pytest.mark.parametrize("override, key", [("flow.logit_std=0", "flow.logit_std"), ("flow.shift=-1", "flow.shift"),
                                           ("flow.mode_scale=3", "flow.mode_scale"), ("flow.guidance=-1", "flow.guidance"),
                                           ("flow.weighting_scheme=cosine", "flow.weighting_scheme")])
def test_flow_config_is_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_flux_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(unpack_latents(packed, 8, 6), FluxPipeline._unpack_latents(packed, 16, 12, 2))  # pixels, vae x2
    assert torch.equal(latent_image_ids(8, 6, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_conditioning_equals_the_stock_pipelines_encode_prompt(fixture, request):
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(fixture)
    family = family_of(detect_spec(str(folder)))
    prompts = ["a red circle", "photo of a small dog"]
    ours = family.prompt_encoder()(prompts)
    pipe = DiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        if fixture == "tiny_sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
            assert ours.prompt_embeds.shape == (2, 77 + 256, 32) and ours.pooled_prompt_embeds.shape == (2, 16 + 24)
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, None)
            assert ours.prompt_embeds.shape == (2, 512, 32) and ours.pooled_prompt_embeds.shape == (2, 16)
            assert torch.equal(text_ids, torch.zeros(512, 3))
    assert torch.equal(ours.prompt_embeds, embeds) and torch.equal(ours.pooled_prompt_embeds, pooled)
    # the same rule on the pipeline's own parts (sampling, evaluation)
    with torch.no_grad():
        again = family.encode_prompts(family.pipeline_text_encoders(pipe), prompts, "cpu")
    assert torch.equal(again.prompt_embeds, ours.prompt_embeds)


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_the_transformer_receives_what_the_pipeline_passes(fixture, request):
    folder = request.getfixturevalue(fixture)
    family = family_of(detect_spec(str(folder)), flow=FlowConfig(guidance=4.0))
    net = family.load_network()
    seen = {}
    net.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = TextConditioning(torch.randn(2, 7, 32), torch.randn(2, 40 if fixture == "tiny_sd3" else 16))
    noisy, t = torch.randn(2, 16, 16, 16), torch.tensor([731.0, 120.0])
    out = family.predict(net, noisy, t, cond)
    assert out.shape == noisy.shape
    if fixture == "tiny_sd3":  # StableDiffusion3Pipeline: timestep = sigma * 1000
        assert torch.equal(seen["timestep"], t) and torch.equal(seen["hidden_states"], noisy)
    else:  # FluxPipeline: timestep / 1000, the guidance value, packed tokens and their ids, zero text ids
        assert torch.equal(seen["timestep"], t / 1000) and torch.equal(seen["guidance"], torch.tensor([4.0, 4.0]))
        assert torch.equal(seen["hidden_states"], pack_latents(noisy))
        assert torch.equal(seen["img_ids"], latent_image_ids(16, 16, "cpu", torch.float32))
        assert torch.equal(seen["txt_ids"], torch.zeros(7, 3))
    assert torch.equal(seen["encoder_hidden_states"], cond.prompt_embeds)
    assert torch.equal(seen["pooled_projections"], cond.pooled_prompt_embeds)


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_draws_are_per_pair_and_share_one_sigma(fixture, request):
    family = family_of(detect_spec(str(request.getfixturevalue(fixture))))
    cfg = load_config(None, ["data.resolution=32", "data.caption_dropout=0.5"])
    both = family.draw_items(cfg, torch.tensor([0, 0]), torch.tensor([3, 5]))
    alone = family.draw_items(cfg, torch.tensor([0]), torch.tensor([5]))
    for key in both:  # pair 5's draws do not depend on what else is in the batch
        assert torch.equal(both[key][1:], alone[key]), key
    t = both["timesteps"]
    assert t.dtype == torch.float32 and t.shape == (2,) and bool(((t > 0) & (t <= 1000)).all())
    assert both["noise"].shape == (2, 16, 16, 16)


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_policy_and_reference_receive_identical_inputs(fixture, finetune, request):
    """One pair_errors call: the reference forward and the policy forward get bit-identical keyword inputs; the
    loss weighting multiplies both errors alike."""
    from diffusion_dpo.models.lora import add_lora
    from diffusion_dpo.models.reference import Reference
    from diffusion_dpo.train.batch import PairBatch
    from diffusion_dpo.train.step import pair_errors

    folder = request.getfixturevalue(fixture)
    family = family_of(detect_spec(str(folder)), flow=FlowConfig(loss_weighting="sigma_sqrt"))
    net = family.load_network()
    if finetune == "lora":
        add_lora(net, 4, None, 0.0, list(family.lora_targets), init_weights="gaussian")  # policy != reference
    reference = Reference(net, lora=finetune == "lora")
    calls = []
    for module in {net, reference.unet}:
        module.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    cond = family.prompt_encoder()(["a red circle", "a blue square"])
    batch = PairBatch(torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g), cond,
                      torch.randn(2, 16, 16, 16, generator=g), torch.tensor([700.0, 80.0]))
    errors = pair_errors(net, reference, family, None, batch)
    assert len(calls) == 2
    ref_kw, pol_kw = calls
    assert ref_kw.keys() == pol_kw.keys()
    for k, v in ref_kw.items():
        assert torch.equal(v, pol_kw[k]) if isinstance(v, torch.Tensor) else v == pol_kw[k], k
    if finetune == "full":  # a frozen copy of the starting weights: equal errors at initialisation
        assert torch.equal(errors.policy_w, errors.ref_w) and torch.equal(errors.policy_l, errors.ref_l)
    unweighted = pair_errors(net, reference, family_of(family.spec), None, batch)
    w = torch.tensor([700.0, 80.0]).div(1000) ** -2
    torch.testing.assert_close(errors.ref_w, unweighted.ref_w * w)
    torch.testing.assert_close(errors.policy_l, unweighted.policy_l * w)


@pytest.mark.fault(input="`data.resolution` giving an odd latent side for SD3 / Flux (2x2 patches)",
                   behaviour="ConfigError at setup naming data.resolution and the multiple it needs")
@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_flux"])
def test_resolution_must_give_even_latent_sides(fixture, request):
    from dataclasses import replace

    spec = replace(detect_spec(str(request.getfixturevalue(fixture))), vae_downsample=8)  # a real 8x VAE
    family = family_of(spec)
    assert family.latent_shape(1024) == (16, 128, 128)
    with pytest.raises(ConfigError, match="data.resolution must be a multiple of 16 for .* got 520"):
        family.check_settings(load_config(None, ["data.resolution=520"]))


def test_lora_targets_missing_the_text_stream_are_reported(tiny_sd3, caplog):
    family = family_of(detect_spec(str(tiny_sd3)))
    with caplog.at_level("WARNING", logger="diffusion_dpo.models.families.flowbase"):
        family.check_settings(load_config(None, ["lora.target_modules=[to_q,to_k,to_v,to_out.0]"]))  # the UNet set
    assert "['add_k_proj', 'add_q_proj', 'add_v_proj', 'to_add_out']" in caplog.text and "sd3" in caplog.text
    caplog.clear()
    targets = "[" + ",".join(family.lora_targets) + "]"
    with caplog.at_level("WARNING", logger="diffusion_dpo.models.families.flowbase"):
        family.check_settings(load_config(None, [f"lora.target_modules={targets}"]))
        family.check_settings(load_config(None, []).with_network_defaults(family.lora_targets))  # unset: the family's
    assert caplog.text == ""
