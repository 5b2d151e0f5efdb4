"""What the flow-matching transformer families (SD3 / SD3.5, Flux.1) share: a transformer instead of a UNet,
sigma sampling and the velocity target of models/flow.py, T5 + CLIP text encoders, the adapter file of a
transformer. The maths is in models/flow.py; sd3.py and flux.py say how the network is called."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Optional

import torch

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.models.diffusion import pair_generator
from diffusion_dpo.models.families.base import ModelFamily
from diffusion_dpo.models.flow import FlowSchedule, loss_weight, noisy_and_velocity, sigma_sampler, sigmas_of, \
    stratified_timesteps
from diffusion_dpo.models.loading import PipelineConfigs, load_pretrained

log = logging.getLogger(__name__)


class FlowMatchingFamily(ModelFamily):
    t5_max_length: ClassVar[int]
    """T5 tokens per prompt: the pipeline's default max_sequence_length (what sampling with it uses)."""
    prediction_types = ("flow",)  # the velocity noise - x0 (models/flow.py)
    network_folder = "transformer"
    lora_layers_key = "transformer_lora_layers"
    sampling_schedulers = ("flow_euler",)  # a DDPM-family sampler (DDIM, LCM, ...) integrates another process

    @classmethod
    def matches(cls, configs: PipelineConfigs) -> bool:
        return configs.component_class("transformer") == cls.network_class

    @classmethod
    def spec_fields(cls, configs: PipelineConfigs) -> dict[str, Any]:
        """Whether the transformer embeds a guidance value (Flux dev), and the scheduler's shift settings."""
        import diffusers

        transformer = configs.part("transformer", getattr(diffusers, cls.network_class))
        schedule = FlowSchedule.from_config(configs.part("scheduler", diffusers.FlowMatchEulerDiscreteScheduler))
        return {"guidance_embeds": bool(transformer.get("guidance_embeds", False)),
                "extra": {"flow_schedule": vars(schedule)}}

    @property
    def schedule(self) -> FlowSchedule:
        return FlowSchedule(**self.spec.extra["flow_schedule"])

    @property
    def has_guidance_embedding(self) -> bool:
        return self.spec.guidance_embeds

    def load_network(self, dtype: torch.dtype = torch.float32):
        import diffusers

        spec = self.spec
        return load_pretrained(getattr(diffusers, self.network_class), spec.pretrained, "transformer", "transformer",
                               spec.revision, spec.variant, torch_dtype=dtype)

    def load_noise_scheduler(self, device=None):
        """The pipeline's FlowMatchEulerDiscreteScheduler (the training maths reads only the spec's schedule)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        spec = self.spec
        return load_pretrained(FlowMatchEulerDiscreteScheduler, spec.pretrained, "scheduler", "scheduler", spec.revision)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w), h and w even: both transformers cut latents into 2x2 patches."""
        c, h, w = super().latent_shape(resolution)
        if h % 2 or w % 2:
            raise ConfigError(f"data.resolution must be a multiple of {2 * self.spec.vae_downsample} for {self.name} "
                              f"(2x2 latent patches of a {self.spec.vae_downsample}x VAE), got {resolution}")
        return c, h, w

    def check_settings(self, cfg: Any) -> None:
        self.latent_shape(cfg.data.resolution)  # even latent sides
        missing = sorted(set(self.lora_targets) - set(cfg.lora.target_modules))
        if cfg.train.finetune == "lora" and missing:  # an explicit list (e.g. the UNet set: no text stream)
            log.warning("lora.target_modules %s leaves %s of the %s transformer without adapters (its recommended set: "
                        "%s; docs/flow.md, 'LoRA targets')", list(cfg.lora.target_modules), missing, self.name,
                        list(self.lora_targets))
        if cfg.lora.export_kohya and cfg.train.finetune == "lora":
            raise ConfigError(f"lora.export_kohya writes UNet key names (lora_unet_*) and does not apply to the {self.name}"
                              " transformer: remove it (pytorch_lora_weights.safetensors loads with load_lora_weights)")

    def image_seq_len(self, latent_shape: tuple[int, int, int]) -> int:
        """Image tokens of one latent (2x2 patches in both families): the resolution shift's sequence length."""
        _, h, w = latent_shape
        return (h // 2) * (w // 2)

    def draw_items(self, cfg: Any, epochs: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """As ModelFamily.draw_items, with the timestep drawn by flow.weighting_scheme and the shifts
        (models.flow.sigma_sampler): timesteps = sigma * num_train_timesteps, float32. train.timestep_range is
        not used."""
        from diffusion_dpo.models.diffusion import draw_pair_randomness

        gens = [pair_generator(cfg.train.seed, int(e), int(i)) for e, i in zip(epochs, indices)]
        shape = self.latent_shape(cfg.data.resolution)
        draw = sigma_sampler(self.flow, self.schedule, self.image_seq_len(shape))
        return draw_pair_randomness(gens, shape, 0, 1, cfg.data.caption_dropout, draw_timestep=draw)

    def evaluation_timesteps(self, k: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """K fixed timesteps (sigma * N, float32) at the quantiles of this run's sigma sampling (flow settings and
        the scheduler's shifts: models.flow.stratified_timesteps)."""
        return stratified_timesteps(self.flow, self.schedule, self.image_seq_len(latent_shape), k)

    def noisy_and_target(self, scheduler, latents, noise, timesteps):
        """x_sigma = (1 - sigma) x0 + sigma noise, target noise - x0, sigma = timestep / num_train_timesteps."""
        return noisy_and_velocity(latents, noise, sigmas_of(timesteps, self.spec.num_train_timesteps).to(latents.device))

    def draw_settings(self) -> dict[str, Any]:
        return {"flow": dict(vars(self.flow))}

    def error_weight(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        return loss_weight(self.flow.loss_weighting, sigmas_of(timesteps, self.spec.num_train_timesteps))


def t5_states(tokenizer, encoder, prompts: list[str], max_length: int, device) -> torch.Tensor:
    """T5 last hidden states (B, max_length, D), padded to max_length, no attention mask (as the SD3 and Flux
    pipelines' _get_t5_prompt_embeds)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids.to(device)
    return encoder(ids)[0]
