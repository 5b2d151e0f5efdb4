"""Sampling, evaluation and implicit-reward accuracy with the flow-matching pipelines (SD3 / SD3.5, Flux.1) on tiny
real-class models: presets per checkpoint, schedulers that fit, tuned models (transformer LoRA, tuned transformer),
bit-identical reruns, and implicit accuracy equal to the training step's own metric."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_dpo.cli import main
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.evaluate.prompts import Prompt, PromptSet
from diffusion_dpo.evaluate.sampling import SampledModel, resolve_settings, sample_model, tuned_model

PROMPTS = PromptSet("test", "inline", (Prompt("a red cat", "animals"), Prompt("a blue square", "shapes")))
FAST = dict(steps=2, resolution=32, progress=False)
FLOW = ["tiny_sd3", "tiny_flux"]


def _pipe(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path)


def _configs(pipe):
    from diffusion_dpo.models.loading import PipelineConfigs

    return PipelineConfigs.of_pipeline(pipe)


def _lora(base, out):
    """A transformer LoRA written by the pipeline class's own save_lora_weights (what `train` writes for SD3 / Flux),
    its lora_B drawn at random so that it changes the output (peft initialises it to zero)."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = _pipe(base)
    net = pipe.transformer
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    type(pipe).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(net))
    return out


def _tuned_transformer(base, out, scale=0.05):
    """A full fine-tune's output: OUT/transformer/ (scale 0: an exact copy of the base's)."""
    net = _pipe(base).transformer
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    net.save_pretrained(out / "transformer")
    return out


# ------------------------------------------------------------------------------------------------ presets
def test_model_card_presets_follow_the_checkpoint(tiny_sd3, tiny_flux):
    """SD3 Medium 28 / 7.0, SD3.5 Large (QK norm) 28 / 3.5, SD3.5 Medium (dual attention) 40 / 4.5; FLUX.1-dev
    (guidance embedding) 50 / 3.5, FLUX.1-schnell (none) 4 steps and no guidance; LCM's card 4 / 8.0."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    def card(family, pipe):
        s = resolve_settings("model-card", family, _configs(pipe))
        return s.steps, s.guidance

    pipe = _pipe(tiny_sd3)
    assert card("sd3", pipe) == (28, 7.0) and resolve_settings("model-card", "sd3", _configs(pipe)).scheduler == "default"
    kw = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=40, pos_embed_max_size=8)
    pipe.transformer = SD3Transformer2DModel(num_layers=2, qk_norm="rms_norm", **kw)
    assert card("sd3", pipe) == (28, 3.5)
    pipe.transformer = SD3Transformer2DModel(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,), **kw)
    assert card("sd3", pipe) == (40, 4.5)

    flux = _pipe(tiny_flux)
    assert card("flux", flux) == (50, 3.5)
    flux.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    assert card("flux", flux) == (4, None)
    assert (resolve_settings("model-card", "lcm").steps, resolve_settings("model-card", "lcm").guidance) == (4, 8.0)
    # the Diffusion-DPO notebook has no flow model: 50 steps at the pipeline's own guidance; flags still override
    assert (resolve_settings("paper", "sd3").steps, resolve_settings("paper", "sd3").guidance) == (50, None)
    assert resolve_settings("model-card", "flux", _configs(flux), steps=7).steps == 7
    assert resolve_settings(None, "sd3", scheduler="flow_euler").scheduler == "flow_euler"


@pytest.mark.fault(input="`--scheduler ddim` (or another DDPM-process sampler: ddpm, pndm, euler, euler_a, dpmpp, lcm) "
                         "for an SD3 / Flux pipeline", behaviour="exit 2: names the scheduler, the pipeline class and "
                                                                 "the schedulers that fit (default, flow_euler)")
def test_a_ddpm_scheduler_for_a_flow_pipeline_is_one_line(tiny_sd3, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red cat\n")
    rc = main(["sample", "--base", str(tiny_sd3), "--out", str(tmp_path / "s"), "--prompts", str(tmp_path / "p.txt"),
               "--scheduler", "ddim", "--steps", "2", "--resolution", "32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--scheduler 'ddim', which does not sample a StableDiffusion3Pipeline (sd3 family); choose --scheduler " \
           "default or flow_euler" in err
    assert not list((tmp_path / "s").rglob("*.png"))
    with pytest.raises(ConfigError, match="--scheduler 'flow_euler', which does not sample a StableDiffusionPipeline"):
        resolve_settings(None, "sd", scheduler="flow_euler")


@pytest.mark.fault(input="`--preset drawbench-sd` / `drawbench-lcm` (DDIM / LCM samplers) for an SD3 / Flux pipeline",
                   behaviour="exit 2: the preset's scheduler does not sample a flow-matching pipeline; names the "
                             "schedulers that fit")
def test_a_ddpm_preset_for_a_flow_pipeline_is_refused(tiny_flux):
    for preset, name in (("drawbench-sd", "ddim"), ("drawbench-lcm", "lcm")):
        with pytest.raises(ConfigError, match=f"--preset {preset} samples with '{name}', which does not sample a "
                                              "FluxPipeline"):
            resolve_settings(preset, "flux", _configs(_pipe(tiny_flux)))


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory, tiny_flux):
    """The tiny Flux pipeline with a transformer without guidance embedding (a FLUX.1-schnell-like checkpoint)."""
    from diffusers import FluxTransformer2DModel

    pipe = _pipe(tiny_flux)
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    path = tmp_path_factory.mktemp("tiny_schnell")
    pipe.save_pretrained(path)
    return path


@pytest.mark.fault(input="`--guidance G` for a Flux transformer without guidance embedding (FLUX.1-schnell)",
                   behaviour="exit 2: FluxPipeline would ignore it; names the flag and says to drop it")
def test_guidance_for_a_flux_without_guidance_embedding_is_one_line(tiny_schnell, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red cat\n")
    args = ["sample", "--base", str(tiny_schnell), "--out", str(tmp_path / "s"), "--prompts", str(tmp_path / "p.txt"),
            "--steps", "2", "--resolution", "32", "--quiet"]
    assert main([*args, "--guidance", "3.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guidance 3.5: this Flux transformer has no guidance embedding" in err
    assert main(args) == 0  # without the flag it samples
    assert len(list((tmp_path / "s" / "base").glob("*.png"))) == 1


@pytest.mark.fault(input="`--negative-prompt` for a Flux pipeline",
                   behaviour="exit 2: FluxPipeline ignores negative prompts (no classifier-free guidance)")
def test_a_negative_prompt_for_flux_is_refused(tiny_flux):
    with pytest.raises(ConfigError, match="--negative-prompt: FluxPipeline ignores a negative prompt"):
        resolve_settings(None, "flux", _configs(_pipe(tiny_flux)), negative_prompt="blurry")
    assert resolve_settings(None, "sd3", negative_prompt="blurry").negative_prompt == "blurry"  # SD3 has CFG


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("fixture", FLOW)
def test_same_seed_same_png_bytes(fixture, request, tmp_path):
    base = str(request.getfixturevalue(fixture))
    a = sample_model(SampledModel("base", base), PROMPTS, tmp_path / "a", images_per_prompt=2, preset="model-card", **FAST)
    b = sample_model(SampledModel("base", base), PROMPTS, tmp_path / "b", images_per_prompt=2, preset="model-card",
                     batch_size=1, **FAST)
    assert a.generated == 4
    for f in a.files:
        assert (a.folder / f).read_bytes() == (b.folder / f).read_bytes()
    assert len({(a.folder / f).read_bytes() for f in a.files}) == 4  # distinct seeds, distinct images
    record = json.loads((a.folder / "sampling.json").read_text())
    assert record["family"] == fixture.removeprefix("tiny_") and record["preset"] == "model-card"
    assert record["sampler"]["steps"] == 2 and record["sampler"]["scheduler"] == "default"
    c = sample_model(SampledModel("base", base), PROMPTS.limit(1), tmp_path / "c", scheduler="flow_euler", **FAST)
    assert (c.folder / "00000_00.png").read_bytes() == (a.folder / "00000_00.png").read_bytes()  # its own scheduler


@pytest.mark.parametrize("fixture", FLOW)
def test_tuned_transformer_and_transformer_lora(fixture, request, tmp_path):
    base = str(request.getfixturevalue(fixture))
    lora = _lora(base, tmp_path / "lora")
    tuned = _tuned_transformer(base, tmp_path / "tuned")
    same = _tuned_transformer(base, tmp_path / "same", scale=0.0)
    assert tuned_model("x", base, str(lora)).lora == str(lora)
    assert tuned_model("x", base, str(tuned)).unet == str(tuned)  # found by its transformer/config.json
    out = tmp_path / "s"
    images = {}
    for spec in (SampledModel("base", base), tuned_model("lora", base, str(lora)), tuned_model("tuned", base, str(tuned)),
                 tuned_model("same", base, str(same)), SampledModel("inner", base, unet=str(tuned / "transformer"))):
        r = sample_model(spec, PROMPTS.limit(1), out, **FAST)
        images[spec.name] = (r.folder / "00000_00.png").read_bytes()
    assert images["same"] == images["base"]  # the tuned network replaced the base's, nothing else changed
    assert images["lora"] != images["base"] and images["tuned"] != images["base"]
    assert images["inner"] == images["tuned"]  # the folder itself or the one holding transformer/


@pytest.mark.fault(input="`--unet DIR` / `--transformer DIR` without a config.json (nor DIR/transformer/config.json) "
                         "for an SD3 / Flux base", behaviour="exit 2: names the folder and the network class to save")
def test_a_tuned_folder_without_a_transformer_is_one_line(tiny_sd3, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red cat\n")
    (tmp_path / "empty").mkdir()
    rc = main(["sample", "--base", str(tiny_sd3), "--transformer", str(tmp_path / "empty"), "--out", str(tmp_path / "s"),
               "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--resolution", "32", "--quiet"])
    err = capsys.readouterr().err.splitlines()  # loading progress bars come before it
    assert rc == 2 and err[-1].startswith("error: ") and sum(line.startswith("error") for line in err) == 1
    err = err[-1]
    assert f"nor in {tmp_path / 'empty'}/transformer); pass a folder saved with SD3Transformer2DModel.save_pretrained" in err


@pytest.mark.parametrize("fixture", FLOW)
def test_evaluate_samples_then_scores_a_tuned_model(fixture, request, tmp_path):
    """`evaluate --base --tuned` end to end with a toy reward: an exact copy of the base draws the base's images (every
    prompt a tie, win rate 50%); a LoRA draws other images."""
    base = str(request.getfixturevalue(fixture))
    same = _tuned_transformer(base, tmp_path / "same", scale=0.0)
    lora = _lora(base, tmp_path / "lora")
    (tmp_path / "p.txt").write_text("a red cat\na blue square\na green dog\n")
    rc = main(["evaluate", "--base", base, "--tuned", f"same={same}", "--tuned", f"lora={lora}",
               "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--resolution", "32", "--images-per-prompt", "2",
               "--metrics", "diffusion_dpo.feedback.toy_rewards:brightness", "--bootstrap", "200",
               "--out", str(tmp_path / "report"), "--quiet"])
    assert rc == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    get = {e["model"]: e for e in results["entries"]}
    assert get["same"]["vs_baseline"]["win_rate"] == 0.5 and get["same"]["vs_baseline"]["ties"] == 3
    assert get["same"]["mean"] == get["base"]["mean"] and get["lora"]["mean"] != get["base"]["mean"]
    assert len((tmp_path / "report" / "scores.jsonl").read_text().splitlines()) == 3 * 3 * 2


# ------------------------------------------------------------------------------------------------ implicit accuracy
def test_flow_evaluation_timesteps_are_the_sigma_quantiles_by_hand(tiny_sd3, tiny_flux):
    """K = 2: p = 1/4, 3/4 -> logit-normal u = sigmoid(-+0.6745) -> table index floor(1000 u) -> sigma = (1000 - index)
    / 1000 -> SD3: static shift 3 s / (1 + 2 s); Flux: time shift exp(mu) / (exp(mu) + 1/s - 1), mu at 8x8 tokens."""
    from diffusion_dpo.models.families import detect_spec, family_of

    z = 0.6744897501960817  # Phi^-1(3/4)
    sigmas = [(1000 - math.floor(1000 / (1 + math.exp(-x)))) / 1000 for x in (z, -z)]  # ascending sigma
    sd3 = family_of(detect_spec(str(tiny_sd3)))
    expected = [1000 * 3 * s / (1 + 2 * s) for s in sigmas]
    assert sd3.evaluation_timesteps(2, sd3.latent_shape(32)).tolist() == pytest.approx(expected, rel=1e-6)
    flux = family_of(detect_spec(str(tiny_flux)))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
    expected = [1000 * math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in sigmas]
    assert flux.evaluation_timesteps(2, flux.latent_shape(32)).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def bright_pairs(tmp_path_factory):
    from diffusion_dpo.data.synthetic import write_manifest

    return write_manifest(tmp_path_factory.mktemp("pairs"), n=4, seed=1)


@pytest.mark.parametrize("fixture", FLOW)
def test_implicit_accuracy_equals_the_training_steps_own_metric(fixture, request, bright_pairs, tmp_path):
    """One timestep (K = 1): implicit accuracy and mean logit are the DPO loss's implicit_acc and inside on the same
    pairs, noise and sigma, computed here through train.step.preference_step with the LoRA loaded independently."""
    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.dataset import PairDataset, collate_pairs
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform
    from diffusion_dpo.evaluate.implicit import implicit_accuracy
    from diffusion_dpo.losses.dpo import DPOLoss
    from diffusion_dpo.models.diffusion import pair_generator
    from diffusion_dpo.models.encode import encode_images, scale_latents
    from diffusion_dpo.models.families import detect_spec, family_of
    from diffusion_dpo.models.reference import Reference
    from diffusion_dpo.train.batch import PairBatch
    from diffusion_dpo.train.step import preference_step

    base = request.getfixturevalue(fixture)
    lora = _lora(base, tmp_path / "lora")
    beta = 1000.0
    r = implicit_accuracy(str(base), str(bright_pairs), lora=str(lora), num_timesteps=1, beta=beta, resolution=32,
                          seed=3)
    assert r["pairs"] == 4 and r["ties"] == 0

    spec = detect_spec(str(base))
    family = family_of(spec)
    policy = family.load_network()
    policy.load_lora_adapter(str(lora / "pytorch_lora_weights.safetensors"), prefix="transformer")
    policy.requires_grad_(False)
    source = open_source(DataConfig(source=str(bright_pairs), resolution=32))
    data = PairDataset(source, PairTransform(32), seed=0)
    raw = collate_pairs([data[i] for i in range(len(data))])
    vae = family.load_vae()
    lat_w, lat_l = (scale_latents(encode_images(vae, raw["pixel_values"][:, j])[0], spec) for j in (0, 1))
    noise = torch.stack([torch.randn(lat_w.shape[1:], generator=pair_generator(3, 0, i)) for i in range(4)])
    t = family.evaluation_timesteps(1, family.latent_shape(32)).repeat(4)
    batch = PairBatch(lat_w, lat_l, family.prompt_encoder()(raw["prompts"]), noise, t)
    with torch.no_grad():
        out = preference_step(policy, Reference(policy, lora=True), DPOLoss(beta), family,
                              family.load_noise_scheduler(), batch)
    assert r["accuracy"] == pytest.approx(float(out.metrics["implicit_acc"]))
    assert r["mean_dpo_logit"] == pytest.approx(float(out.metrics["inside"]), rel=1e-4, abs=1e-6)
    assert r["timesteps"] == pytest.approx(t[:1].tolist())


@pytest.mark.parametrize("fixture", FLOW)
def test_implicit_accuracy_of_the_base_itself_is_all_ties(fixture, request, bright_pairs):
    """The base as its own tuned transformer (the pipeline folder holds transformer/): every logit exactly 0."""
    base = str(request.getfixturevalue(fixture))
    from diffusion_dpo.evaluate.implicit import implicit_accuracy

    r = implicit_accuracy(base, str(bright_pairs), unet=base, num_timesteps=2, resolution=32)
    assert r["ties"] == 4 and r["accuracy"] == 0.0 and r["mean_dpo_logit"] == 0.0 and len(r["timesteps"]) == 2


@pytest.mark.parametrize("fixture", FLOW)
def test_a_flow_policy_fit_to_winners_ranks_them_first_with_a_positive_logit(fixture, request, tmp_path):
    """Guards the sign for velocity errors: a transformer trained (plain flow matching, random sigma and noise) on the
    bright winners of a set of pairs ranks those pairs' winners above their losers (the tiny random VAEs separate
    bright from dark latents too little for held-out pairs to be a stable check at this size), mean logit > 0."""
    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.dataset import PairDataset, collate_pairs
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.synthetic import write_manifest
    from diffusion_dpo.data.transforms import PairTransform
    from diffusion_dpo.evaluate.implicit import implicit_accuracy
    from diffusion_dpo.models.encode import encode_images, scale_latents
    from diffusion_dpo.models.families import detect_spec, family_of

    base = request.getfixturevalue(fixture)
    train = write_manifest(tmp_path / "train", n=8, seed=1)  # winners bright, losers dark (same scenes)
    spec = detect_spec(str(base))
    family = family_of(spec)
    data = PairDataset(open_source(DataConfig(source=str(train), resolution=32)), PairTransform(32), seed=0)
    raw = collate_pairs([data[i] for i in range(len(data))])
    with torch.no_grad():
        lat_w = scale_latents(encode_images(family.load_vae(), raw["pixel_values"][:, 0])[0], spec)
        cond = family.prompt_encoder()(raw["prompts"])
    net = family.load_network()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        noise = torch.randn(lat_w.shape, generator=g)
        t = torch.rand(len(lat_w), generator=g) * 1000
        noisy, target = family.noisy_and_target(None, lat_w, noise, t)
        loss = (family.predict(net, noisy, t, cond) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.save_pretrained(tmp_path / "policy" / "transformer")
    r = implicit_accuracy(str(base), str(train), unet=str(tmp_path / "policy"), num_timesteps=4, resolution=32)
    assert r["pairs"] == 8 and r["ties"] == 0
    assert r["accuracy"] >= 0.75 and r["mean_dpo_logit"] > 0  # measured here: SD3 1.0, Flux 0.875


def test_implicit_accuracy_samples_sigma_as_the_tuned_run_did(tiny_sd3, bright_pairs, tmp_path):
    """A run folder (train's output.dir: config.yaml + transformer/) trained with flow.weighting_scheme=uniform and no
    shift is evaluated at that run's sigma quantiles: K = 2, p = 1/4, 3/4 -> table index 250, 750 -> sigma 0.75, 0.25
    -> timesteps [250, 750]; the same transformer without the run's config.yaml gets the defaults (logit-normal,
    the scheduler's shift 3)."""
    import shutil

    import yaml

    from diffusion_dpo.evaluate.implicit import implicit_accuracy

    run = tmp_path / "run"
    shutil.copytree(tiny_sd3 / "transformer", run / "transformer")
    (run / "config.yaml").write_text(yaml.safe_dump({"flow": {"weighting_scheme": "uniform", "shift": 1.0}}))
    r = implicit_accuracy(str(tiny_sd3), str(bright_pairs), unet=str(run), num_timesteps=2, resolution=32, max_pairs=1)
    assert r["timesteps"] == pytest.approx([250.0, 750.0])
    (run / "config.yaml").unlink()
    r = implicit_accuracy(str(tiny_sd3), str(bright_pairs), unet=str(run), num_timesteps=2, resolution=32, max_pairs=1)
    z = 0.6744897501960817
    sigmas = [(1000 - math.floor(1000 / (1 + math.exp(-x)))) / 1000 for x in (z, -z)]
    assert r["timesteps"] == pytest.approx([1000 * 3 * s / (1 + 2 * s) for s in sigmas], rel=1e-6)
