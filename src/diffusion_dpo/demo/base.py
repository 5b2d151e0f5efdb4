"""The demo's base model: a miniature Stable Diffusion pretrained on the demo world.

The shipped copy lives in `diffusion_dpo/assets/demo_base/` (a StableDiffusionPipeline folder, float32
safetensors, about 5 MB, built by `python -m diffusion_dpo.demo.pretrain --out ...`; see `pretrain.json` inside
for the exact settings). `load_or_build_base()` returns that folder, or builds one from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "demo_base"
DEFAULT_STEPS = 20  # DDIM steps used by the demo when sampling the base
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale used by the demo


def _is_pipeline(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def default_build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "diffusion_dpo" / "demo_base"


def load_or_build_base(path: str | Path | None = None, rebuild: bool = False) -> Path:
    """Folder of the demo base pipeline.

    path=None, rebuild=False: the shipped base. path given and holding a pipeline: that folder.
    rebuild=True, or a path without a pipeline: pretrain from scratch into `path` (default
    `~/.cache/diffusion_dpo/demo_base`; about 15 minutes on 2 CPU cores) and return it.
    """
    if path is None and not rebuild:
        if not _is_pipeline(SHIPPED_BASE):
            raise FileNotFoundError(f"the shipped demo base is missing from {SHIPPED_BASE}; rebuild it with "
                                    "`python -m diffusion_dpo.demo.pretrain --out DIR` (or --rebuild-base)")
        return SHIPPED_BASE
    target = Path(path) if path is not None else default_build_dir()
    if _is_pipeline(target) and not rebuild:
        return target
    from diffusion_dpo.demo.pretrain import PretrainConfig, pretrain

    return pretrain(PretrainConfig(out=str(target)))


def load_pipeline(path: str | Path | None = None):
    """The base as a stock `StableDiffusionPipeline` in float32 on the CPU (progress bar off)."""
    from diffusers import StableDiffusionPipeline

    folder = load_or_build_base(path) if path is None or not _is_pipeline(Path(path)) else Path(path)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = DEFAULT_STEPS,
           guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64) -> list[Image.Image]:
    """One image per (prompt, seed) pair (zipped), each from its own `torch.Generator(seed)`, so an
    image does not depend on what else is in the batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    from diffusion_dpo.demo.world import SIZE

    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk_p, chunk_s = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in chunk_s]
        out = pipe(chunk_p, num_inference_steps=steps, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                   generator=gens)
        images.extend(out.images)
    return images


def image_grid(images: Sequence[Image.Image], cols: int, scale: int = 4) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def describe_samples(pipe, prompts: Sequence[str], seeds_per_prompt: int = 4, steps: int = DEFAULT_STEPS,
                     guidance_scale: float = DEFAULT_GUIDANCE) -> dict:
    """Fidelity and judge-score spread of `pipe` on `prompts` x seeds 0..K-1: a quick health check of a base.

    judge_std_within is the mean over prompts of the std across seeds: the variation best-of-K pairs can use."""
    from diffusion_dpo.demo.fidelity import fidelity
    from diffusion_dpo.demo.judge import judge_scores

    flat_p = [p for p in prompts for _ in range(seeds_per_prompt)]
    flat_s = [s for _ in prompts for s in range(seeds_per_prompt)]
    images = sample(pipe, flat_p, flat_s, steps=steps, guidance_scale=guidance_scale)
    fid = fidelity(images, flat_p)
    scores = judge_scores(images, flat_p).view(len(prompts), seeds_per_prompt)
    return {
        "images": images,
        "fidelity_percent": fid.percent,
        "color_percent": 100.0 * float(fid.color_ok.mean()),
        "shape_percent": 100.0 * float(fid.shape_ok.mean()),
        "judge_mean": float(scores.mean()),
        "judge_std": float(scores.std()),
        "judge_std_within": float(scores.std(dim=1).mean()),
    }
