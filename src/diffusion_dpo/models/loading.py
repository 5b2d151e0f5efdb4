"""Load the pieces of a diffusers pipeline (hub id or local folder), whatever its family.

ModelSpec is the recorded description of a pipeline (model_spec.json); which family it is, and what that
means for loading text encoders, conditioning and targets, lives in models.families (detect_spec there).
Frozen parts (VAE, text encoders) are put in eval mode with gradients off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.runtime import hub_offline


@dataclass
class ModelSpec:
    """What was detected about a pipeline, recorded with every output."""

    pretrained: str
    family: str  # a name of models.families.FAMILIES; family_of(spec) gives the family object
    prediction_type: str  # "epsilon" | "v_prediction" (UNet families) | "flow" (velocity of flow matching)
    pipeline_class: str
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae_scaling_factor: float = 0.18215
    vae_shift_factor: float = 0.0  # SD3 / Flux VAEs: latents = (vae latent - shift) * scale (encode.scale_latents)
    latent_channels: int = 4
    vae_downsample: int = 8
    time_cond_proj_dim: Optional[int] = None
    num_train_timesteps: int = 1000
    guidance_embeds: bool = False  # a guidance-distilled transformer (Flux dev): the guidance value is an input
    extra: dict = field(default_factory=dict)


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
            f"access (`hf download {pretrained}`) or point model.pretrained at a local folder.") if hub_offline() else ""
    return ModelLoadError(f"could not load {what} of '{pretrained}': {type(err).__name__}: {err}.{hint}")


def load_pretrained(cls, pretrained: str, subfolder: Optional[str], what: str, revision=None, variant=None, **kw):
    try:
        return cls.from_pretrained(pretrained, subfolder=subfolder, revision=revision, variant=variant,
                                   local_files_only=hub_offline(), **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise _load_error(pretrained, what, err) from err


def load_component_config(cls, pretrained: str, subfolder: str, revision) -> dict:
    """The config.json of one pipeline part, as a dict (a one-line ModelLoadError when missing)."""
    try:
        return dict(cls.load_config(pretrained, subfolder=subfolder, revision=revision, local_files_only=hub_offline()))
    except (OSError, ValueError) as err:
        raise _load_error(pretrained, f"{subfolder}/config", err) from err


class PipelineConfigs:
    """The configs of a pipeline folder or hub id, each read once when first asked for (family detection)."""

    def __init__(self, pretrained: str, revision: Optional[str] = None):
        from diffusers import DiffusionPipeline

        if not pretrained:
            raise ModelLoadError("model.pretrained is empty; set it to a diffusers pipeline folder or hub id")
        self.pretrained, self.revision = pretrained, revision
        try:
            self.index = dict(DiffusionPipeline.load_config(pretrained, revision=revision, local_files_only=hub_offline()))
        except (OSError, ValueError) as err:
            raise _load_error(pretrained, "model_index.json", err) from err
        self.pipeline_class: str = self.index.get("_class_name", "")
        self._parts: dict[str, dict] = {}

    @classmethod
    def of_pipeline(cls, pipe: Any) -> "PipelineConfigs":
        """The configs of an already loaded pipeline: its class name and its network's (UNet or transformer) config."""
        configs = cls.__new__(cls)
        configs.pretrained, configs.revision = str(pipe.name_or_path), None
        parts = {name: part for name, part in pipe.components.items() if name in ("unet", "transformer")}
        configs.index = {"_class_name": type(pipe).__name__} | {k: ["diffusers", type(v).__name__] for k, v in parts.items()}
        configs.pipeline_class = type(pipe).__name__
        configs._parts = {name: dict(part.config) for name, part in parts.items()}
        return configs

    def component_class(self, subfolder: str) -> str:
        """The class name model_index.json gives `subfolder` ('' when it has none): e.g. SD3Transformer2DModel."""
        entry = self.index.get(subfolder)
        return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else ""

    def part(self, subfolder: str, cls) -> dict:
        """The config of `subfolder` (unet, scheduler, vae, ...) as the diffusers class `cls` reads it."""
        if subfolder not in self._parts:
            self._parts[subfolder] = load_component_config(cls, self.pretrained, subfolder, self.revision)
        return self._parts[subfolder]

    def unet(self) -> dict:
        from diffusers import UNet2DConditionModel

        return self.part("unet", UNet2DConditionModel)


def load_noise_scheduler(spec: ModelSpec, device=None):
    """The training noise scheduler (DDPM maths) of the pipeline, whatever its sampling scheduler is; its
    alphas_cumprod on `device` when given."""
    from diffusers import DDPMScheduler

    sched = load_pretrained(DDPMScheduler, spec.pretrained, "scheduler", "scheduler", spec.revision)
    if sched.config.prediction_type != spec.prediction_type:
        sched.register_to_config(prediction_type=spec.prediction_type)
    if device is not None:
        sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    return sched


def load_unet(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    return load_pretrained(UNet2DConditionModel, spec.pretrained, "unet", "unet", spec.revision, spec.variant,
                            torch_dtype=dtype)


def load_vae(spec: ModelSpec, dtype: torch.dtype = torch.float32, vae_path: Optional[str] = None):
    from diffusers import AutoencoderKL

    if vae_path:
        vae = load_pretrained(AutoencoderKL, vae_path, None, "vae", torch_dtype=dtype)
    else:
        vae = load_pretrained(AutoencoderKL, spec.pretrained, "vae", "vae", spec.revision, spec.variant, torch_dtype=dtype)
    return freeze(vae)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)
