"""Implicit-reward accuracy on a tiny pipeline: invariants, not magic numbers."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_dpo.evaluate.implicit import fixed_timesteps, implicit_accuracy


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


def test_fixed_timesteps_are_evenly_spread():
    assert fixed_timesteps(1000, 4).tolist() == [125, 375, 625, 875]


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


def test_sdxl_runs(tiny_sdxl, pairs):
    r = implicit_accuracy(str(tiny_sdxl), str(pairs / "pairs.jsonl"), unet=str(tiny_sdxl), num_timesteps=1)
    assert r["ties"] == 5
