"""Implicit-reward accuracy on a tiny pipeline: invariants, not magic numbers."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_dpo.evaluate.implicit import implicit_accuracy


@pytest.fixture
def pairs(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    rows, swapped = [], []
    for i in range(5):
        for kind in ("w", "l"):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / f"{kind}{i}.png")
        rows.append({"prompt": "a red cat", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
        swapped.append({"prompt": "a red cat", "chosen": f"l{i}.png", "rejected": f"w{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "swapped.jsonl").write_text("\n".join(map(json.dumps, swapped)))
    return tmp_path


@pytest.fixture
def tuned_unet(tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(tmp_path / "tuned")
    return tmp_path / "tuned"


def test_fixed_timesteps_are_evenly_spread(tiny_sd):
    from diffusion_dpo.models.families import detect_spec, family_of

    family = family_of(detect_spec(str(tiny_sd)))
    assert family.evaluation_timesteps(4, family.latent_shape(32)).tolist() == [125, 375, 625, 875]


def test_identical_policy_and_reference_give_zero_logits(tiny_sd, pairs):
    r = implicit_accuracy(str(tiny_sd), str(pairs / "pairs.jsonl"), unet=str(tiny_sd), num_timesteps=2)
    assert r["pairs"] == 5 and r["ties"] == 5 and r["accuracy"] == 0.0 and r["mean_inside"] == 0.0


def test_swapping_winners_and_losers_flips_every_decision(tiny_sd, pairs, tuned_unet):
    a = implicit_accuracy(str(tiny_sd), str(pairs / "pairs.jsonl"), unet=str(tuned_unet), num_timesteps=2)
    again = implicit_accuracy(str(tiny_sd), str(pairs / "pairs.jsonl"), unet=str(tuned_unet), num_timesteps=2,
                              batch_size=2)
    b = implicit_accuracy(str(tiny_sd), str(pairs / "swapped.jsonl"), unet=str(tuned_unet), num_timesteps=2)
    assert a["ties"] == 0
    assert a["mean_inside"] == pytest.approx(again["mean_inside"], rel=1e-4)  # fixed noise, batch-independent
    assert a["accuracy"] == again["accuracy"]
    assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0)
    assert a["mean_inside"] == pytest.approx(-b["mean_inside"], rel=1e-4)


def test_lora_policy_with_adapter_off_as_reference(tiny_sd, pairs, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # peft initialises lora_B to zero (a no-op adapter): make it do something
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    r = implicit_accuracy(str(tiny_sd), str(pairs / "pairs.jsonl"), lora=str(tmp_path / "lora"), num_timesteps=1)
    assert r["pairs"] == 5 and r["mean_inside"] != 0.0 and 0.0 <= r["accuracy"] <= 1.0


def test_a_lora_policy_keeps_the_alpha_it_was_trained_with(tiny_sd, tmp_path):
    """lora.alpha 8 at rank 4 (scale 2, as save_lora records in the file): the policy computes what the trained
    UNet computes, not the scale-1 network diffusers builds when it takes alpha = rank."""
    from diffusers import UNet2DConditionModel

    from diffusion_dpo.evaluate.implicit import _load_policy
    from diffusion_dpo.models.families import SDFamily, detect_spec, family_of
    from diffusion_dpo.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    torch.manual_seed(0)
    add_lora(unet, 4, 8.0, 0.0, ["to_q", "to_v", "conv1"], "gaussian")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(unet, tmp_path / "lora", SDFamily)
    family = family_of(detect_spec(str(tiny_sd)))
    policy, _, _ = _load_policy(str(tiny_sd), family, str(tmp_path / "lora"), None, "float32")
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 3, unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(policy(x, t, ctx).sample, unet(x, t, ctx).sample, rtol=1e-5, atol=1e-6)


def test_sdxl_runs(tiny_sdxl, pairs):
    r = implicit_accuracy(str(tiny_sdxl), str(pairs / "pairs.jsonl"), unet=str(tiny_sdxl), num_timesteps=1)
    assert r["ties"] == 5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_vae_encodes_in_float32_when_the_unets_run_in_half_precision(tiny_sd, pairs, monkeypatch, dtype):
    """SDXL's VAE overflows in float16: the latents come from a float32 VAE whatever --dtype is."""
    import diffusion_dpo.models.encode as encode

    seen = []
    original = encode.encode_images

    def spy(vae, pixels):
        hook = vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        try:
            seen.append(next(vae.parameters()).dtype)
            return original(vae, pixels)
        finally:
            hook.remove()

    monkeypatch.setattr(encode, "encode_images", spy)
    r = implicit_accuracy(str(tiny_sd), str(pairs / "pairs.jsonl"), unet=str(tiny_sd), num_timesteps=1, dtype=dtype)
    assert len(seen) == 2 * 2 * 2  # 5 pairs in batches of 4: 2 batches x (winners, losers) x (weights, input)
    assert set(seen) == {torch.float32}
    assert r["vae_dtype"] == "float32" and r["unet_dtype"] == dtype and r["ties"] == 5


def _nan_word_pipeline(tiny_sd, tmp_path, word: str):
    """A copy of the tiny pipeline whose text encoder embeds `word` as NaN: any prompt with it gives NaN errors."""
    import shutil

    from transformers import CLIPTextModel, CLIPTokenizer

    path = tmp_path / "nan_pipe"
    shutil.copytree(tiny_sd, path)
    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
    with torch.no_grad():
        encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(f"{word}</w>")] = float("nan")
    encoder.save_pretrained(path / "text_encoder")
    return path


@pytest.mark.fault(input="a pair whose implicit-reward logit is NaN or inf (e.g. a float16 overflow)",
                   behaviour="exit 2 naming the pair (index, key, prompt) and the timestep; never counted as a miss")
def test_a_non_finite_logit_stops_naming_the_pair(tiny_sd, tmp_path):
    from PIL import Image

    from diffusion_dpo.errors import NonFiniteLossError

    base = _nan_word_pipeline(tiny_sd, tmp_path, "dog")
    rows = []
    for i in range(5):
        for kind, color in (("w", (200, 30, 30)), ("l", (30, 30, 200))):
            Image.new("RGB", (40, 40), color).save(tmp_path / f"{kind}{i}.png")
        rows.append({"prompt": "a photo of a dog" if i == 3 else "a red cat", "chosen": f"w{i}.png",
                     "rejected": f"l{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(NonFiniteLossError, match=r"pair 3 \(key 'line4', prompt 'a photo of a dog'\) has a non-finite "
                                                 r"DPO logit \(nan\) at timestep 500") as info:
        implicit_accuracy(str(base), str(tmp_path / "pairs.jsonl"), unet=str(tiny_sd), num_timesteps=1, batch_size=2)
    assert "\n" not in str(info.value)
    # the same pairs without the NaN prompt evaluate normally
    (tmp_path / "ok.jsonl").write_text("\n".join(map(json.dumps, rows[:3])))
    assert implicit_accuracy(str(base), str(tmp_path / "ok.jsonl"), unet=str(tiny_sd), num_timesteps=1)["ties"] == 3


def test_check_finite_logits_names_the_first_bad_pair_and_hints_at_float16():
    from diffusion_dpo.data.records import PairRecord
    from diffusion_dpo.errors import NonFiniteLossError
    from diffusion_dpo.evaluate.implicit import check_finite_logits

    source = [PairRecord(f"prompt {i}", f"w{i}.png", f"l{i}.png", key=f"k{i}") for i in range(6)]
    check_finite_logits(torch.tensor([0.5, -1.0]), [2, 3], source, 125, "float16")  # finite: no error
    with pytest.raises(NonFiniteLossError, match=r"pair 4 \(key 'k4', prompt 'prompt 4'\).*\(inf\) at timestep 125, "
                                                 r"2 of 3 pairs in its batch; float16 overflowed"):
        check_finite_logits(torch.tensor([0.5, float("inf"), float("nan")]), [3, 4, 5], source, 125, "float16")


def test_a_user_given_vae_encodes_the_pairs(tiny_sd, pairs, tuned_unet, tmp_path):
    """`vae=` (as model.vae in training) replaces the base's VAE: the same VAE gives the same logits, a VAE
    with a different encoder gives different latents and so different logits."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    with torch.no_grad():
        vae.quant_conv.bias.add_(0.5)  # shifts every posterior mean
    vae.save_pretrained(tmp_path / "other_vae")
    args = (str(tiny_sd), str(pairs / "pairs.jsonl"))
    default = implicit_accuracy(*args, unet=str(tuned_unet), num_timesteps=1)
    same = implicit_accuracy(*args, unet=str(tuned_unet), num_timesteps=1, vae=str(tiny_sd / "vae"))
    other = implicit_accuracy(*args, unet=str(tuned_unet), num_timesteps=1, vae=str(tmp_path / "other_vae"))
    assert same["mean_inside"] == default["mean_inside"] and same["vae"] == str(tiny_sd / "vae")
    assert other["mean_inside"] != pytest.approx(default["mean_inside"], rel=1e-3)


def _fit_unet_to_winners(tiny_sd, manifest, out, steps: int = 30):
    """A full copy of the base UNet trained (plain denoising loss, random noise and timesteps) on the winner
    latents only: it learns that images are bright, so it denoises bright winners better and dark losers
    worse than the base. Returns (folder, winner/loser latents, prompt conditioning) for an independent check."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.dataset import PairDataset, collate_pairs
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform
    from diffusion_dpo.models.encode import encode_images
    from diffusion_dpo.models.families import detect_spec, family_of
    from diffusion_dpo.models.loading import load_vae

    spec = detect_spec(str(tiny_sd))
    dataset = PairDataset(open_source(DataConfig(source=str(manifest), resolution=32)), PairTransform(32), seed=0)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))])
    vae = load_vae(spec)
    with torch.no_grad():
        lat_w, lat_l = (encode_images(vae, batch["pixel_values"][:, j])[0] * spec.vae_scaling_factor for j in (0, 1))
    cond = family_of(spec).prompt_encoder()(batch["prompts"]).prompt_embeds
    scheduler = DDPMScheduler.from_pretrained(tiny_sd / "scheduler")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        noise = torch.randn(lat_w.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(lat_w),), generator=g)
        pred = unet(scheduler.add_noise(lat_w, noise, t), t, encoder_hidden_states=cond).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.save_pretrained(out)
    return out, lat_w, lat_l, cond, scheduler


def test_a_policy_that_prefers_winners_scores_above_chance_with_a_positive_logit(tiny_sd, tmp_path):
    """Guards the sign of the logit: a sign flip would report 1 - accuracy and a negative mean logit."""
    from diffusers import UNet2DConditionModel

    from diffusion_dpo.data.synthetic import write_manifest

    train = write_manifest(tmp_path / "train", n=8, seed=1)  # winners bright, losers dark (same scenes)
    heldout = write_manifest(tmp_path / "heldout", n=8, seed=2)
    folder, lat_w, lat_l, cond, scheduler = _fit_unet_to_winners(tiny_sd, train, tmp_path / "policy")

    # independent check that the policy does prefer winners: its error drops on winners relative to losers,
    # against the base, on the training pairs, with fresh noise (errors as in the DPO loss: mean over C,H,W)
    policy, base = (UNet2DConditionModel.from_pretrained(p) for p in (folder, tiny_sd / "unet"))
    g = torch.Generator().manual_seed(123)
    margin = 0.0
    with torch.no_grad():
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(lat_w.shape, generator=g)
            ts = torch.full((len(lat_w),), t)

            def err(net, lat):
                return (net(scheduler.add_noise(lat, noise, ts), ts, encoder_hidden_states=cond).sample - noise
                        ).pow(2).mean(dim=(1, 2, 3))

            margin += float(((err(policy, lat_w) - err(policy, lat_l)) - (err(base, lat_w) - err(base, lat_l))).mean())
    assert margin < 0  # the winners' error fell more (or rose less) than the losers'

    r = implicit_accuracy(str(tiny_sd), str(heldout), unet=str(folder), num_timesteps=4)
    assert r["pairs"] == 8 and r["ties"] == 0
    assert r["accuracy"] > 0.5 and r["mean_inside"] > 0
