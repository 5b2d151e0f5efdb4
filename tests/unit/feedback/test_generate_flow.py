"""`generate-pairs` and iterate's model fusing with the flow-matching pipelines (SD3 / Flux) on tiny real-class models."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from diffusion_dpo.evaluate.prompts import Prompt, PromptSet
from diffusion_dpo.evaluate.sampling import SampledModel, image_seed, sample_model
from diffusion_dpo.feedback.generate import STRATEGIES, form_pairs, generate_pairs
from diffusion_dpo.feedback.reward_judge import load_judge

PROMPTS = PromptSet("test", "inline", (Prompt("a red circle"), Prompt("a blue square")))
FAST = dict(steps=2, resolution=32, progress=False)
FLOW = ["tiny_sd3", "tiny_flux"]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("fixture", FLOW)
def test_every_strategy_pairs_the_same_flow_samples(fixture, request, tmp_path):
    """One sampling (same seeds, same images, same scores) under every strategy; the pairs are the strategy's pairs
    of those scores, winner above loser; each image is the one `sample` draws with its recorded seed."""
    base = str(request.getfixturevalue(fixture))
    judge = load_judge(["feedback_test_rewards:brightness"])
    runs = {s: generate_pairs(base, PROMPTS, tmp_path / s, judge, images_per_prompt=3, strategy=s, seed=5,
                              preset="model-card", **FAST) for s in STRATEGIES}
    samples = _rows(tmp_path / "all" / "samples.jsonl")
    assert len(samples) == 6 and len({s["score"] for s in samples}) == 6  # distinct scores: every pair has a winner
    for strategy, result in runs.items():
        folder = tmp_path / strategy
        assert _rows(folder / "samples.jsonl") == samples
        for s in samples:
            assert (folder / s["file"]).read_bytes() == (tmp_path / "all" / s["file"]).read_bytes()
        pairs = _rows(folder / "pairs.jsonl")
        expected = []
        for p in range(2):
            scores = [s["score"] for s in samples if s["prompt_index"] == p]
            expected += [(p, w, l) for w, l in form_pairs(scores, strategy, 0.0, random.Random(f"5:{p}"))]
        assert [(r["prompt_index"], r["image_index_chosen"], r["image_index_rejected"]) for r in pairs] == expected
        assert len(pairs) == {"best-worst": 2, "all": 6, "random": 2, "all-ranked": 6}[strategy] == result.pairs
        assert all(r["score_chosen"] > r["score_rejected"] for r in pairs)
        assert all(("rank_difference" in r) == (strategy == "all-ranked") for r in pairs)
        record = json.loads((folder / "generation.json").read_text())
        assert record["family"] == fixture.removeprefix("tiny_") and record["sampler"]["steps"] == 2
    # the recorded seed regenerates the image with `sample` (same sampler settings)
    one = sample_model(SampledModel("again", base), PROMPTS, tmp_path / "again", images_per_prompt=3, seed=5,
                       preset="model-card", **FAST)
    assert samples[4]["seed"] == image_seed(5, 1, 1)
    assert (one.folder / "00001_01.png").read_bytes() == (tmp_path / "all" / "images" / "00001_01.png").read_bytes()


@pytest.mark.parametrize("fixture", FLOW)
def test_write_cache_stores_the_flow_latents_that_decode_to_the_images(fixture, request, tmp_path):
    """--write-cache with SD3 / Flux: the images and pairs are those of a run without it; each cached latent (Flux:
    unpacked from 2x2 tokens; unshifted and unscaled, as `prepare` stores VAE latents) decodes with the VAE to the saved
    PNG; the cached text conditioning is what the family's PromptEncoder computes (CLIP + T5, pooled)."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from diffusion_dpo.cache.store import CachedPairDataset
    from diffusion_dpo.models.families import detect_spec, family_of

    base = request.getfixturevalue(fixture)
    judge = load_judge(["feedback_test_rewards:brightness"])
    kw = dict(images_per_prompt=3, strategy="all", seed=2, chunk_size=1, sample_batch_size=2, **FAST)
    plain = generate_pairs(str(base), PROMPTS, tmp_path / "plain", judge, **kw)
    out = tmp_path / "gen"
    result = generate_pairs(str(base), PROMPTS, out, judge, write_cache=True, cache_dtype="float32", **kw)
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "plain" / "pairs.jsonl").read_bytes()
    pairs = _rows(out / "pairs.jsonl")
    assert len(pairs) == result.pairs == plain.pairs >= 3
    spec = detect_spec(str(base))
    assert spec.vae_shift_factor == pytest.approx(0.1)  # the tiny VAEs have a shift: a missing "+ shift" shows
    ds = CachedPairDataset(out / "cache", spec, "sample", seed=0, resolution=32)
    vae = AutoencoderKL.from_pretrained(base / "vae")
    encoder = family_of(spec).prompt_encoder()
    for i, row in enumerate(pairs):
        item = ds[i]
        assert item["latent_mean"].shape == (2, 16, 16, 16)
        with torch.no_grad():
            pixels = vae.decode(item["latent_mean"]).sample
        decoded = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int16)
        for j, name in enumerate(("chosen", "rejected")):
            stored = np.asarray(Image.open(out / row[name]).convert("RGB"), dtype=np.int16)
            assert np.abs(decoded[j] - stored).max() <= 2, (i, name)
        cond = encoder([row["prompt"]])
        assert torch.allclose(item["prompt_embeds"], cond.prompt_embeds[0], atol=1e-5)
        assert torch.allclose(item["pooled_prompt_embeds"], cond.pooled_prompt_embeds[0], atol=1e-5)


@pytest.mark.parametrize("fixture", FLOW)
def test_fuse_model_builds_the_tuned_flow_pipeline(fixture, request, tmp_path):
    """iterate's next-round model: a full fine-tune's transformer/ is swapped in bit for bit; a transformer LoRA is
    fused (W + B A: the fused model samples the adapter's images up to rounding)."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file

    from diffusion_dpo.feedback.iterate import fuse_model

    base = str(request.getfixturevalue(fixture))
    pipe = DiffusionPipeline.from_pretrained(base)
    net = pipe.transformer
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    net.save_pretrained(tmp_path / "full" / "transformer")
    model = fuse_model(base, tmp_path / "full", "full", tmp_path / "model_full")
    tuned = load_file(tmp_path / "full" / "transformer" / "diffusion_pytorch_model.safetensors")
    fused = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == fused.keys() and all(torch.equal(tuned[k], fused[k]) for k in tuned)

    net = DiffusionPipeline.from_pretrained(base).transformer
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    type(pipe).save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(net))
    model = fuse_model(base, tmp_path / "lora", "lora", tmp_path / "model_lora")
    a = sample_model(SampledModel("lora", base, lora=str(tmp_path / "lora")), PROMPTS.limit(1), tmp_path / "s", **FAST)
    b = sample_model(SampledModel("fused", str(model)), PROMPTS.limit(1), tmp_path / "s", **FAST)
    c = sample_model(SampledModel("base", base), PROMPTS.limit(1), tmp_path / "s", **FAST)
    from PIL import Image

    pixels = {r.folder.name: np.asarray(Image.open(r.folder / "00000_00.png"), dtype=np.int16) for r in (a, b, c)}
    assert np.abs(pixels["lora"] - pixels["fused"]).max() <= 2
    assert np.abs(pixels["lora"] - pixels["base"]).max() > 2
