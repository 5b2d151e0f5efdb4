"""Load the pieces of a diffusers pipeline (hub id or local folder) for training.

The family is detected from the pipeline folder: `model_index.json`'s class name (SDXL pipelines),
the UNet config (`time_cond_proj_dim` -> latent consistency) and the scheduler config
(`prediction_type`). Frozen parts (VAE, text encoders) are put in eval mode with gradients off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSpec:
    """What was detected about a pipeline, recorded with every output."""

    pretrained: str
    family: str  # "sd" | "sdxl" | "lcm"
    prediction_type: str  # "epsilon" | "v_prediction"
    pipeline_class: str
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae_scaling_factor: float = 0.18215
    latent_channels: int = 4
    vae_downsample: int = 8
    time_cond_proj_dim: Optional[int] = None
    num_train_timesteps: int = 1000
    extra: dict = field(default_factory=dict)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else (./x, /x, ~/x, a/b/c) is meant as a folder
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _load_error(pretrained: str, what: str, err: Exception) -> ModelLoadError:
    if _looks_like_path(pretrained) and not Path(pretrained).expanduser().exists():
        return ModelLoadError(f"model folder '{pretrained}' does not exist; set model.pretrained to a diffusers "
                              "pipeline folder (with model_index.json) or a hub id like 'org/name'")
    if Path(pretrained).expanduser().exists():
        return ModelLoadError(f"could not load {what} from folder '{pretrained}': {err}. The folder must be a "
                              "diffusers pipeline (save_pretrained layout: model_index.json, unet/, vae/, text_encoder/ ...)")
    hint = (" The hub is offline (HF_HUB_OFFLINE=1) and no cached copy was found: download it first on a machine with "
            f"access (`hf download {pretrained}`) or point model.pretrained at a local folder.") if _offline() else ""
    return ModelLoadError(f"could not load {what} of '{pretrained}': {type(err).__name__}: {err}.{hint}")


def _from_pretrained(cls, pretrained: str, subfolder: Optional[str], what: str, revision=None, variant=None, **kw):
    try:
        return cls.from_pretrained(pretrained, subfolder=subfolder, revision=revision, variant=variant,
                                   local_files_only=_offline(), **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise _load_error(pretrained, what, err) from err


def detect_spec(pretrained: str, revision: Optional[str] = None, variant: Optional[str] = None,
                family: str = "auto", prediction_type: Optional[str] = None) -> ModelSpec:
    from diffusers import AutoencoderKL, DiffusionPipeline, DDPMScheduler, UNet2DConditionModel

    if not pretrained:
        raise ModelLoadError("model.pretrained is empty; set it to a diffusers pipeline folder or hub id")
    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision, local_files_only=_offline())
    except (OSError, ValueError) as err:
        raise _load_error(pretrained, "model_index.json", err) from err
    pipeline_class = index.get("_class_name", "")
    unet_cfg = _config(UNet2DConditionModel, pretrained, "unet", revision)
    sched_cfg = _config(DDPMScheduler, pretrained, "scheduler", revision)
    vae_cfg = _config(AutoencoderKL, pretrained, "vae", revision)
    if family == "auto":
        if "XL" in pipeline_class or unet_cfg.get("addition_embed_type") == "text_time":
            family = "sdxl"
        elif unet_cfg.get("time_cond_proj_dim") is not None:
            family = "lcm"
        elif "StableDiffusion" in pipeline_class or "LatentConsistency" in pipeline_class:
            family = "sd"
        else:
            raise ModelLoadError(f"'{pretrained}' is a {pipeline_class or 'unknown pipeline'}; supported families are "
                                 "Stable Diffusion 1.x/2.x, SDXL and latent consistency UNets (set model.family to force one)")
    pred = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"prediction_type '{pred}' of '{pretrained}' is not supported (epsilon or v_prediction)")
    return ModelSpec(
        pretrained=str(pretrained), family=family, prediction_type=pred, pipeline_class=pipeline_class,
        revision=revision, variant=variant,
        vae_scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        latent_channels=int(vae_cfg.get("latent_channels", 4)),
        vae_downsample=2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1),
        time_cond_proj_dim=unet_cfg.get("time_cond_proj_dim"),
        num_train_timesteps=int(sched_cfg.get("num_train_timesteps", 1000)),
    )


def _config(cls, pretrained: str, subfolder: str, revision) -> dict:
    try:
        return dict(cls.load_config(pretrained, subfolder=subfolder, revision=revision, local_files_only=_offline()))
    except (OSError, ValueError) as err:
        raise _load_error(pretrained, f"{subfolder}/config", err) from err


def load_noise_scheduler(spec: ModelSpec):
    """The training noise scheduler (DDPM maths) of the pipeline, whatever its sampling scheduler is."""
    from diffusers import DDPMScheduler

    sched = _from_pretrained(DDPMScheduler, spec.pretrained, "scheduler", "scheduler", spec.revision)
    if sched.config.prediction_type != spec.prediction_type:
        sched.register_to_config(prediction_type=spec.prediction_type)
    return sched


def load_unet(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    return _from_pretrained(UNet2DConditionModel, spec.pretrained, "unet", "unet", spec.revision, spec.variant,
                            torch_dtype=dtype)


def load_vae(spec: ModelSpec, dtype: torch.dtype = torch.float32, vae_path: Optional[str] = None):
    from diffusers import AutoencoderKL

    if vae_path:
        vae = _from_pretrained(AutoencoderKL, vae_path, None, "vae", torch_dtype=dtype)
    else:
        vae = _from_pretrained(AutoencoderKL, spec.pretrained, "vae", "vae", spec.revision, spec.variant, torch_dtype=dtype)
    return freeze(vae)


def load_text_encoders(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """[(tokenizer, text_encoder)] : one for SD/LCM, two for SDXL (the second with projection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    names = [("tokenizer", "text_encoder", CLIPTextModel)]
    if spec.family == "sdxl":
        names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    out = []
    for tok_name, enc_name, enc_cls in names:
        tokenizer = _from_pretrained(CLIPTokenizer, spec.pretrained, tok_name, tok_name, spec.revision)
        if len(tokenizer) < 10:
            # CLIPTokenizer.from_pretrained on a folder without vocab files silently builds a 2-token tokenizer
            raise ModelLoadError(f"'{spec.pretrained}/{tok_name}' has no usable tokenizer files (vocab.json + "
                                 "merges.txt or tokenizer.json): re-save the pipeline with save_pretrained")
        encoder = _from_pretrained(enc_cls, spec.pretrained, enc_name, enc_name, spec.revision, spec.variant, dtype=dtype)
        out.append((tokenizer, freeze(encoder)))
    return out


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)
