"""Sampling a prompt set with fixed seeds, for a base model, a LoRA on it, or a tuned UNet.

Every image (prompt p, index i) gets its own torch.Generator seeded with `image_seed(seed, p, i)` on the
CPU, so base and tuned models start from the same noise, and batching or the device does not change
which noise an image gets. Layout of one model's folder:

    <out>/<model_name>/00000_00.png ...   image i of prompt p: f"{p:05d}_{i:02d}.png"
    <out>/<model_name>/samples.jsonl      one line per planned image: prompt, category, seed, file
    <out>/<model_name>/sampling.json      model, sampler settings, prompt set, seeds: what made the images

Images are written to a temporary file and renamed, so an interrupted run never leaves a half-written
PNG; a rerun skips the images already on disk. A rerun with different settings is refused, and so is a
non-empty <out>/<model_name> without sampling.json (not ours: its files would be overwritten or taken for samples).

diffusion_dpo.runtime (and with it torch) is imported inside the functions that use it: the commands' parsers
import this module for its tables, and `diffusion-dpo sample --help` should stay cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusion_dpo.errors import ConfigError, ModelLoadError, UserError
from diffusion_dpo.evaluate.prompts import PromptSet

log = logging.getLogger(__name__)

SCHEDULERS = {  # name -> diffusers class name; "default" keeps the pipeline's own scheduler. Which names fit a
    # pipeline is its family's (ModelFamily.sampling_schedulers): the DDPM-process samplers for the UNet families,
    # flow_euler for SD3 / Flux
    "default": None, "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


@dataclass(frozen=True)
class SamplerSettings:
    """How images are drawn. `guidance=None` and `resolution=None` mean: the preset's per-family value,
    else the pipeline's default."""

    scheduler: str = "default"
    steps: int = 50
    guidance: float | None = None
    resolution: int | None = None
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8, got {self.resolution}")


# The published settings (docs/evaluation.md). Steps and guidance are the family's (ModelFamily.preset_values:
# preset_steps / preset_guidance, per checkpoint for SD3 and Flux) where the source states them, else the steps
# here and the pipeline's default guidance.
PRESETS: dict[str, dict[str, Any]] = {
    # Diffusion-DPO's notebook: pipeline default scheduler, 50 steps, guidance 7.5 (SD1.5) / 5 (SDXL)
    "paper": {"scheduler": "default", "steps": 50},
    # Curriculum-DPO's DrawBench table: SD DDIM 30 steps 512 px guidance 7.5; LCM: LCM scheduler 8 steps 768 px
    "drawbench-sd": {"scheduler": "ddim", "steps": 30, "resolution": 512},
    "drawbench-lcm": {"scheduler": "lcm", "steps": 8, "resolution": 768},
    # the checkpoint's model card (SD3 / SD3.5, Flux.1, LCM; SD and SDXL cards use the pipeline defaults)
    "model-card": {"scheduler": "default", "steps": 50},
}


def resolve_settings(preset: str | None, family: str, configs: Any = None, **overrides: Any) -> SamplerSettings:
    """Preset values for this model family (its name) and pipeline (`configs`: its models.loading.PipelineConfigs,
    None when unknown), then every non-None override on top. Refuses (ConfigError) a scheduler that does not
    sample the family's noise process and settings the pipeline would silently ignore."""
    from diffusion_dpo.models.families import family_named

    kind = family_named(family)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        family_values = kind.preset_values(preset, configs)
        values = dict(PRESETS[preset], guidance=family_values["guidance"])
        if family_values["steps"] is not None:
            values["steps"] = family_values["steps"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = SamplerSettings(**values)
    if settings.scheduler != "default" and settings.scheduler not in kind.sampling_schedulers:
        via = f"--preset {preset} samples with" if overrides.get("scheduler") is None else "--scheduler"
        raise ConfigError(f"{via} {settings.scheduler!r}, which does not sample a {kind.pipeline_class} ({kind.name} "
                          f"family); choose --scheduler default or {' or '.join(kind.sampling_schedulers)}")
    kind.check_sampling(configs, overrides.get("guidance"), settings.negative_prompt)
    return settings


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image `image_index` of prompt `prompt_index`: first 8 bytes of
    sha256(f"{seed}:{prompt_index}:{image_index}"), masked to 63 bits. Independent of batch, device, model."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_name(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}_{image_index:02d}.png"


@dataclass(frozen=True)
class SampledModel:
    """A model to sample: a base pipeline (folder or hub id), optionally a LoRA folder or a tuned UNet folder.
    (Not models.loading.ModelSpec, which describes a base model's family and components.)"""

    name: str
    base: str
    lora: str | None = None
    unet: str | None = None

    def __post_init__(self) -> None:
        if self.lora and self.unet:
            raise ConfigError(f"model {self.name!r}: give --lora or --unet, not both")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"model name {self.name!r} must be a plain folder name (no '/')")


NETWORK_FOLDERS = ("unet", "transformer")  # where a full fine-tune saves its network (ModelFamily.network_folder)


def tuned_model(name: str, base: str, folder: str) -> SampledModel:
    """`base` with the training result in `folder`: a LoRA (*lora*.safetensors / *lora*.bin there) or a tuned
    network (config.json, or unet/config.json, or transformer/config.json), told apart by its files."""
    path = Path(folder)
    if any(path.glob("*lora*.safetensors")) or any(path.glob("*lora*.bin")):
        return SampledModel(name, base, lora=folder)
    if (path / "config.json").exists() or any((path / sub / "config.json").exists() for sub in NETWORK_FOLDERS):
        return SampledModel(name, base, unet=folder)
    raise ConfigError(f"--tuned {name + '=' + folder!r}: {folder} holds neither LoRA weights (*lora*.safetensors) "
                      f"nor a tuned network (config.json, unet/config.json or transformer/config.json)")


def pipeline_configs(pipe: Any) -> Any:
    """The models.loading.PipelineConfigs of a loaded pipeline (what ModelFamily.preset_values reads)."""
    from diffusion_dpo.models.loading import PipelineConfigs

    return PipelineConfigs.of_pipeline(pipe)


def load_sampling_pipeline(spec: SampledModel, device: str = "cpu", dtype: str = "float32") -> Any:
    """The diffusers pipeline that samples `spec`: its base, with the LoRA loaded (pipe.load_lora_weights: the UNet's
    or the SD3 / Flux transformer's adapter) or the trained network (UNet or transformer) replaced."""
    from diffusers import DiffusionPipeline

    from diffusion_dpo.models.families import family_of_pipeline
    from diffusion_dpo.runtime import hub_offline, torch_dtype

    dtype_ = torch_dtype(dtype)
    local = Path(spec.base).exists()
    try:
        pipe = DiffusionPipeline.from_pretrained(spec.base, dtype=dtype_, local_files_only=local or hub_offline())
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load base pipeline {spec.base!r}: {err}; pass a local diffusers folder "
                             f"with --base PATH") from err
    if spec.unet:
        # the tuned network replaces the base's: same class, the folder itself or its unet/ (transformer/) subfolder
        sub = family_of_pipeline(pipe).network_folder
        net_dir = Path(spec.unet)
        if (net_dir / sub / "config.json").exists():
            net_dir = net_dir / sub
        net_cls = type(getattr(pipe, sub))
        if not (net_dir / "config.json").exists():
            raise ModelLoadError(f"--unet {spec.unet}: no config.json there (nor in {spec.unet}/{sub}); pass a folder "
                                 f"saved with {net_cls.__name__}.save_pretrained")
        setattr(pipe, sub, net_cls.from_pretrained(net_dir, dtype=dtype_))
    if spec.lora:
        if not Path(spec.lora).exists():
            raise ModelLoadError(f"--lora {spec.lora}: folder does not exist")
        try:
            from diffusion_dpo.models.lora import load_lora_into_pipeline

            load_lora_into_pipeline(pipe, spec.lora)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"--lora {spec.lora}: cannot load LoRA weights: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace the pipeline's scheduler by SCHEDULERS[name], built from its config ("default": keep it)."""
    if SCHEDULERS[name] is None:
        return
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])  # diffusers exports its schedulers lazily
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@dataclass
class SampleResult:
    folder: Path
    generated: int = 0
    skipped: int = 0
    files: list[str] = field(default_factory=list)


def sample_model(spec: SampledModel, prompts: PromptSet, out_dir: str | os.PathLike, settings: SamplerSettings | None = None,
                 preset: str | None = None, images_per_prompt: int = 1, seed: int = 0, batch_size: int = 4,
                 device: str = "cpu", dtype: str = "float32", pipe: Any = None, progress: bool = True,
                 **overrides: Any) -> SampleResult:
    """Sample `images_per_prompt` images for each prompt into `out_dir/spec.name`, skipping finished ones.

    `settings` fixes the sampler fully; otherwise it is resolved from `preset` and `overrides`
    (scheduler, steps, guidance, resolution, negative_prompt) for the pipeline's family.
    `pipe` may pass an already loaded pipeline for `spec` (it is then not reloaded).
    """
    import torch

    from diffusion_dpo.models.families import family_of_configs
    from diffusion_dpo.models.loading import PipelineConfigs
    from diffusion_dpo.runtime import save_png_atomic

    folder = Path(out_dir) / spec.name
    _check_folder(folder)
    plan = [(p, i) for p in range(len(prompts)) for i in range(images_per_prompt)]
    todo = [(p, i) for p, i in plan if not (folder / image_name(p, i)).exists()]
    family = configs = None
    if pipe is not None or todo:  # the settings are resolved (and refused) from the configs, before weights load
        configs = pipeline_configs(pipe) if pipe is not None else PipelineConfigs(spec.base)
        family = family_of_configs(configs).name
    if settings is None and family is None:  # nothing to sample: the recorded settings stand (_check_or_write_record)
        settings = SamplerSettings()
    elif settings is None:
        settings = resolve_settings(preset, family, configs, **overrides)
    if pipe is None and todo:
        pipe = load_sampling_pipeline(spec, device, dtype)
    record = {"model": asdict(spec), "family": family, "sampler": asdict(settings), "preset": preset,
              "prompt_set": prompts.name, "prompt_source": prompts.source, "num_prompts": len(prompts),
              "images_per_prompt": images_per_prompt, "seed": seed,
              "seed_rule": "image_seed = sha256(f'{seed}:{prompt_index}:{image_index}')[:8] (63 bits), CPU generator",
              "dtype": dtype}
    _check_or_write_record(folder, record)
    _write_manifest(folder, prompts, images_per_prompt, seed)
    result = SampleResult(folder, skipped=len(plan) - len(todo), files=[image_name(p, i) for p, i in plan])
    if not todo:
        return result
    set_scheduler(pipe, settings.scheduler)
    kwargs: dict[str, Any] = {"num_inference_steps": settings.steps, "output_type": "pil"}
    if settings.guidance is not None:
        kwargs["guidance_scale"] = settings.guidance
    if settings.resolution is not None:
        kwargs["height"] = kwargs["width"] = settings.resolution
    if settings.negative_prompt is not None:
        kwargs["negative_prompt"] = settings.negative_prompt
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"sampling {spec.name}", disable=not progress, unit="img")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        texts = [prompts.prompts[p].text for p, _ in chunk]
        generators = [torch.Generator("cpu").manual_seed(image_seed(seed, p, i)) for p, i in chunk]
        if settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(chunk)
        images = pipe(prompt=texts, generator=generators, **kwargs).images
        for (p, i), image in zip(chunk, images):
            save_png_atomic(image, folder / image_name(p, i))
        result.generated += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return result


def _check_folder(folder: Path) -> None:
    """OUT/NAME must be new, empty or sampled before (sampling.json, written before any image): a user's own
    folder would get its samples.jsonl overwritten and its PNGs taken for already sampled images."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; pass another --name or --out")
    if folder.is_dir() and not (folder / "sampling.json").is_file() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty and was not written by `sample` (no sampling.json); pass another "
                        f"--name or --out, so that no file of yours is overwritten or taken for a sample")


def _check_or_write_record(folder: Path, record: dict) -> None:
    path = folder / "sampling.json"
    if path.exists():
        old = json.loads(path.read_text())
        # the number of prompts/images may grow on a rerun; everything else must match
        keys = [k for k in record if k not in ("num_prompts", "images_per_prompt", "family")]
        diff = [k for k in keys if old.get(k) != record[k] and not (k == "sampler" and record["family"] is None)]
        if diff:
            raise UserError(f"{folder} was sampled with different {', '.join(diff)} "
                            f"(was {', '.join(repr(old.get(k)) for k in diff)}); use another --name or --out "
                            f"instead of mixing images made with different settings")
        if record["family"] is None:  # nothing to generate: keep the recorded settings
            return
    from diffusion_dpo.runtime import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2))


def _write_manifest(folder: Path, prompts: PromptSet, images_per_prompt: int, seed: int) -> None:
    from diffusion_dpo.runtime import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "samples.jsonl", "".join(
        json.dumps({"prompt_index": p, "image_index": i, "prompt": prompt.text, "category": prompt.category,
                    "seed": image_seed(seed, p, i), "file": image_name(p, i)}) + "\n"
        for p, prompt in enumerate(prompts.prompts) for i in range(images_per_prompt)))
