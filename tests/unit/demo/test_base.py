"""The shipped demo base: loads in stock diffusers and draws the asked colour and shape well above chance."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_dpo.demo import base, world
from diffusion_dpo.demo.fidelity import fidelity

PROMPTS = ["a red circle in the centre", "a blue square at the top left", "a yellow triangle at the bottom",
           "a green circle at the right"]


@pytest.fixture(scope="module")
def shipped():
    return base.load_or_build_base()


def test_shipped_base_is_small_safetensors(shipped):
    files = [p for p in shipped.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2 ** 20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    assert json.loads((shipped / "pretrain.json").read_text())["unet_steps_done"] > 0


def test_stock_pipeline_loads_and_samples_with_fidelity_well_above_chance(shipped):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(shipped, local_files_only=True)  # stock call, no dtype
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    seeds = [0, 1]
    prompts = [p for p in PROMPTS for _ in seeds]
    out = pipe(prompts, num_inference_steps=10, guidance_scale=base.DEFAULT_GUIDANCE, height=world.SIZE,
               width=world.SIZE, generator=[torch.Generator().manual_seed(s) for _ in PROMPTS for s in seeds])
    assert len(out.images) == len(prompts) and out.images[0].size == (world.SIZE, world.SIZE)
    # chance for (colour, shape) is 1/15 ~ 7%
    assert fidelity(out.images, prompts).percent >= 50.0


def test_sample_is_deterministic_per_seed_and_independent_of_batch(shipped):
    pipe = base.load_pipeline(shipped)
    a = base.sample(pipe, PROMPTS[:2], [5, 6], steps=4)
    b = base.sample(pipe, PROMPTS[1:2], [6], steps=4)
    import numpy as np

    diff = np.abs(np.asarray(a[1], dtype=np.int16) - np.asarray(b[0], dtype=np.int16))
    assert diff.max() <= 2  # equal up to float summation order across batch sizes


def test_load_or_build_returns_existing_folder(shipped, tmp_path):
    assert base.load_or_build_base(shipped) == shipped


def test_pretrain_writes_a_stock_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_dpo.demo.pretrain import PretrainConfig, pretrain

    out = pretrain(PretrainConfig(out=str(tmp_path / "base"), num_images=32, vae_steps=2, unet_steps=2,
                                  threads=1, save_every=0))
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle in the centre", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    assert json.loads((out / "pretrain.json").read_text())["unet_steps_done"] == 2
