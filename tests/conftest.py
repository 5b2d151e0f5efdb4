"""Shared fixtures: tiny pipelines of the real diffusers classes, built in-process and saved to a
temp folder, so every test goes through the real loading code. Nothing touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One thread: tiny models gain nothing from more, and bit-identity tests (resume, kill -9) compare runs
# whose multi-threaded reductions could otherwise be split differently. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WORDS = ["a", "small", "large", "red", "green", "blue", "circle", "square", "photo", "of", "cat", "dog"]


def _tiny(tmp_path_factory, name, family, prediction_type="epsilon"):
    from diffusion_dpo.models.build import save_tiny_pipeline

    path = tmp_path_factory.mktemp(name)
    return save_tiny_pipeline(path, family=family, prediction_type=prediction_type, resolution=32, words=WORDS)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Folder of a tiny StableDiffusionPipeline (epsilon prediction, 32 px images, 16x16 latents)."""
    return _tiny(tmp_path_factory, "tiny_sd", "sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """Tiny StableDiffusionPipeline with a v-prediction scheduler."""
    return _tiny(tmp_path_factory, "tiny_sd_v", "sd", "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Tiny StableDiffusionXLPipeline (two text encoders, text_time micro-conditioning)."""
    return _tiny(tmp_path_factory, "tiny_sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory):
    """Tiny LatentConsistencyModelPipeline (UNet with time_cond_proj_dim, LCMScheduler)."""
    return _tiny(tmp_path_factory, "tiny_lcm", "lcm")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Commands run in-process (e.g. the demo's --threads) may change torch's thread count; restore it
    so every test computes with the same reductions as the subprocesses it compares against."""
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield
