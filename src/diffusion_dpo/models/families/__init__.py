"""Model families: one module per family behind one interface (base.ModelFamily).

FAMILIES is closed and ordered: detection asks each family in turn whether a pipeline's configs are
its own, so a more specific family (SDXL, LCM) comes before the one it specialises (SD), and the transformer
families (SD3, Flux: recognised by model_index.json's transformer class) before the UNet ones, whose checks read
unet/config.json. Adding a family
is one new module plus one entry here (docs/architecture.md, "How to add a model family").
"""

from __future__ import annotations

from typing import Any, Optional

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.flow_config import FlowConfig
from diffusion_dpo.models.families.base import ModelFamily
from diffusion_dpo.models.families.flux import FluxFamily
from diffusion_dpo.models.families.lcm import LCMFamily
from diffusion_dpo.models.families.sd import SDFamily
from diffusion_dpo.models.families.sd3 import SD3Family
from diffusion_dpo.models.families.sdxl import SDXLFamily
from diffusion_dpo.models.loading import ModelSpec, PipelineConfigs

FAMILIES: tuple[type[ModelFamily], ...] = (SD3Family, FluxFamily, SDXLFamily, LCMFamily, SDFamily)
"""Detection order: the first family whose matches(configs) is true."""
BY_NAME: dict[str, type[ModelFamily]] = {f.name: f for f in FAMILIES}


def detect_spec(pretrained: str, revision: Optional[str] = None, variant: Optional[str] = None,
                family: str = "auto", prediction_type: Optional[str] = None) -> ModelSpec:
    """Read a pipeline's configs and describe it (model.family=auto detects the family, a name forces it)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    configs = PipelineConfigs(pretrained, revision)
    if family == "auto":
        found = next((f for f in FAMILIES if f.matches(configs)), None)
        if found is None:
            raise ModelLoadError(f"'{pretrained}' is a {configs.pipeline_class or 'unknown pipeline'}; supported "
                                 "families are Stable Diffusion 1.x/2.x, SDXL, latent consistency UNets, Stable "
                                 "Diffusion 3 / 3.5 and Flux.1 (set model.family to force one)")
    elif family not in BY_NAME:
        raise ModelLoadError(f"model.family {family!r} is not a known family; choose auto or one of {sorted(BY_NAME)}")
    else:
        found = BY_NAME[family]
    try:
        fields = found.spec_fields(configs)
    except ModelLoadError as err:
        if family == "auto":
            raise
        raise ModelLoadError(f"model.family={family} does not fit '{pretrained}': it is a {configs.pipeline_class or 'pipeline'}"
                             f" without the {found.network_folder}/ of a {found.pipeline_class}; set model.family=auto "
                             "or point model.pretrained at such a pipeline") from err
    sched_cfg = configs.part("scheduler", DDPMScheduler)
    vae_cfg = configs.part("vae", AutoencoderKL)
    pred = prediction_type or sched_cfg.get("prediction_type") or found.prediction_types[0]
    if pred not in found.prediction_types:
        raise ModelLoadError(f"prediction_type '{pred}' of '{pretrained}' is not supported by the {found.name} family "
                             f"({' or '.join(found.prediction_types)})")
    return ModelSpec(
        pretrained=str(pretrained), family=found.name, prediction_type=pred, pipeline_class=configs.pipeline_class,
        revision=revision, variant=variant,
        vae_scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        vae_shift_factor=float(vae_cfg.get("shift_factor") or 0.0),
        latent_channels=int(vae_cfg.get("latent_channels", 4)),
        vae_downsample=2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1),
        num_train_timesteps=int(sched_cfg.get("num_train_timesteps", 1000)),
        **fields,
    )


def family_of(spec: ModelSpec, guidance_scale: float = 8.0, flow: Optional[FlowConfig] = None) -> ModelFamily:
    """The family object of a described pipeline (guidance_scale: model.lcm_guidance_scale; flow: the run's flow
    settings, used by the flow-matching families)."""
    return BY_NAME[spec.family](spec, guidance_scale, flow)


def family_of_pipeline(pipe: Any) -> type[ModelFamily]:
    """The family of a loaded diffusers pipeline (sampling); SD when no family claims it."""
    return family_of_configs(PipelineConfigs.of_pipeline(pipe))


def family_of_configs(configs: PipelineConfigs) -> type[ModelFamily]:
    """The family of a pipeline from its configs alone (sampling settings are checked before any weight loads)."""
    return next((f for f in FAMILIES if f.matches(configs)), SDFamily)


def lora_targets_of_network(network_class: str) -> tuple[str, ...]:
    """The default LoRA targets of the family whose trained network is a `network_class` (the memory planner
    builds networks from configs alone; the UNet families share one set)."""
    found = next((f for f in FAMILIES if f.network_class == network_class), SDFamily)
    return found.lora_targets


def family_named(name: str) -> type[ModelFamily]:
    """The family class called `name` (a recorded model_spec's or a cache manifest's family)."""
    return BY_NAME[name]


__all__ = ["FAMILIES", "ModelFamily", "SDFamily", "SDXLFamily", "LCMFamily", "SD3Family", "FluxFamily", "detect_spec", "family_of", "family_named",
           "family_of_pipeline", "family_of_configs", "lora_targets_of_network"]
