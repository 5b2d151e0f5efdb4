"""The interface every model family implements: what the trainer, the cache, evaluation and sampling ask.

A family is one kind of pipeline (SD 1.x/2.x, SDXL, latent consistency; SD3 / SD3.5 and Flux.1, flow matching). One object per
run, built from the pipeline's ModelSpec by `models.families.family_of(spec)`. The callers never branch on
family names: they ask the object.

    detection      matches(configs), spec_fields(configs)      (class methods; the FAMILIES table is ordered)
    loading        load_text_encoders, load_network, load_vae, load_noise_scheduler
    prompts        encode_prompts(encoders, prompts)          -> TextConditioning (what the cache stores)
    pairs          pair_conditioning(batch, resolution, mode) -> pair_cond per-row conditioning (SDXL time ids)
    randomness     draw_randomness(generators, ...)            per-pair seeded noise / timestep / coins
    diffusion      noisy_and_target(scheduler, latents, noise, t) -> (noisy input, training target); error_weight(t)
    network        predict(net, noisy, t, cond, pair_cond)        -> the network's prediction
    outputs        pipeline_class, network_folder, lora_layers_key, lora_targets, pipeline_text_encoders(pipe)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import torch

from diffusion_dpo.flow_config import FlowConfig
from diffusion_dpo.models.diffusion import draw_pair_randomness, pair_generator
from diffusion_dpo.models.encode import PromptEncoder, TextConditioning
from diffusion_dpo.models.loading import ModelSpec, PipelineConfigs, freeze, load_noise_scheduler, load_pretrained, \
    load_unet, load_vae


class ModelFamily(ABC):
    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    """diffusers pipeline class name for sampling, saving LoRAs and the model card's usage lines."""
    text_encoder_parts: ClassVar[tuple[tuple[str, str, str], ...]] = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    """(tokenizer subfolder, text encoder subfolder, transformers class name) per text encoder, in order; a T5
    encoder's tokenizer is a T5TokenizerFast, the others' a CLIPTokenizer."""
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    """What the network may predict (the first: when the scheduler config names none); model.prediction_type."""
    network_class: ClassVar[str] = "UNet2DConditionModel"
    """The diffusers class of the trained network (loading; the model card's usage lines)."""
    network_folder: ClassVar[str] = "unet"
    """The trained network's pipeline subfolder: where full fine-tuning saves it (`from_pretrained` reads it)."""
    lora_layers_key: ClassVar[str] = "unet_lora_layers"
    """The argument of the pipeline class's save_lora_weights that takes the trained network's adapter."""
    size_conditioned: ClassVar[bool] = False
    """The network is conditioned on image sizes and crops (SDXL time ids): with data.sdxl_time_ids=pair the
    transforms give a pair one geometry (data.transforms.PairTransform same_geometry), and the cache key holds
    the mode."""
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    """Recommended LoRA target modules of the trained network: an unset lora.target_modules resolves to these
    (RunConfig.with_network_defaults; table in docs/recipes.md, "LoRA targets")."""
    preset_guidance: ClassVar[dict[str, float]] = {}
    """Classifier-free guidance of the sampling presets (evaluate.sampling.PRESETS) where the source states one
    for this family; other presets keep the pipeline's default."""
    preset_steps: ClassVar[dict[str, int]] = {}
    """Denoising steps of the sampling presets where the source states them for this family (else the preset's)."""
    sampling_schedulers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "pndm", "euler", "euler_a", "dpmpp", "lcm")
    """The --scheduler names (evaluate.sampling.SCHEDULERS) that sample this family's noise process, besides
    "default" (the pipeline's own scheduler)."""

    def __init__(self, spec: ModelSpec, guidance_scale: float = 8.0, flow: Optional[FlowConfig] = None):
        self.spec = spec
        self.guidance_scale = guidance_scale  # embedded guidance of guidance-distilled networks (LCM)
        self.flow = flow or FlowConfig()  # sigma sampling, loss weighting, Flux guidance (flow-matching families)

    # ------------------------------------------------------------------ detection
    @classmethod
    @abstractmethod
    def matches(cls, configs: PipelineConfigs) -> bool:
        """Whether the pipeline whose configs these are is of this family (asked in FAMILIES order)."""

    @classmethod
    def spec_fields(cls, configs: PipelineConfigs) -> dict[str, Any]:
        """ModelSpec fields read from the network's config (a UNet's guidance embedding width)."""
        return {"time_cond_proj_dim": configs.unet().get("time_cond_proj_dim")}

    # ------------------------------------------------------------------ loading
    def load_text_encoders(self, dtype: torch.dtype = torch.float32) -> list[tuple[Any, Any]]:
        """[(tokenizer, frozen text encoder)] in the order of text_encoder_parts."""
        import transformers

        from diffusion_dpo.errors import ModelLoadError

        spec, out = self.spec, []
        for tok_name, enc_name, enc_cls in self.text_encoder_parts:
            tok_cls = transformers.T5TokenizerFast if enc_cls == "T5EncoderModel" else transformers.CLIPTokenizer
            tokenizer = load_pretrained(tok_cls, spec.pretrained, tok_name, tok_name, spec.revision)
            if len(tokenizer) < 10:
                # CLIPTokenizer.from_pretrained on a folder without vocab files silently builds a 2-token tokenizer
                raise ModelLoadError(f"'{spec.pretrained}/{tok_name}' has no usable tokenizer files (vocab.json + "
                                     "merges.txt or tokenizer.json): re-save the pipeline with save_pretrained")
            encoder = load_pretrained(getattr(transformers, enc_cls), spec.pretrained, enc_name, enc_name,
                                      spec.revision, spec.variant, dtype=dtype)
            out.append((tokenizer, freeze(encoder)))
        return out

    def prompt_encoder(self, dtype: torch.dtype = torch.float32, device="cpu") -> PromptEncoder:
        """This family's frozen text encoders, loaded, on `device`, behind one callable."""
        return PromptEncoder(self, self.load_text_encoders(dtype), device).to(device)

    @classmethod
    def pipeline_text_encoders(cls, pipe: Any) -> list[tuple[Any, Any]]:
        """The same [(tokenizer, text encoder)] taken from a loaded diffusers pipeline's own parts."""
        return [(getattr(pipe, tok), getattr(pipe, enc)) for tok, enc, _ in cls.text_encoder_parts]

    @classmethod
    def preset_values(cls, preset: str, configs: Optional[PipelineConfigs]) -> dict[str, Any]:
        """steps / guidance of the sampling preset `preset` for this pipeline (`configs`: its configs, None when
        unknown) where a source states them; None: the preset's value, else the pipeline's default."""
        return {"steps": cls.preset_steps.get(preset), "guidance": cls.preset_guidance.get(preset)}

    @classmethod
    def check_sampling(cls, configs: Optional[PipelineConfigs], guidance: Optional[float],
                       negative_prompt: Optional[str]) -> None:
        """Raise ConfigError when this pipeline would silently ignore a requested sampler setting."""

    def evaluation_timesteps(self, k: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """K fixed timesteps spread over training's range (implicit-reward accuracy): (k + 0.5) * T / K, int64."""
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * self.spec.num_train_timesteps / k).long()

    def image_latents(self, latents: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """A pipeline's latents as its step-end callback holds them -> (N, C, h, w) of `latent_shape` (C, h, w)."""
        return latents

    def default_resolution(self, network) -> int:
        """The pipeline's default image size in pixels: the network's sample_size latents."""
        return network.config.sample_size * self.spec.vae_downsample

    def load_network(self, dtype: torch.dtype = torch.float32):
        """The trained network (a UNet here; a transformer for flow-matching families)."""
        return load_unet(self.spec, dtype)

    def load_vae(self, dtype: torch.dtype = torch.float32, vae_path: Optional[str] = None):
        return load_vae(self.spec, dtype, vae_path)

    def load_noise_scheduler(self, device=None):
        """The training scheduler (DDPM maths; its alphas_cumprod on `device` when given)."""
        return load_noise_scheduler(self.spec, device)

    # ------------------------------------------------------------------ prompts
    @classmethod
    @abstractmethod
    def encode_prompts(cls, encoders: list[tuple[Any, Any]], prompts: list[str], device) -> TextConditioning:
        """prompts (B) -> text conditioning (float32), what the cache stores and the network receives."""

    # ------------------------------------------------------------------ batches of pairs
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's latent at `resolution` pixels."""
        f = self.spec.vae_downsample
        return self.spec.latent_channels, resolution // f, resolution // f

    def pair_conditioning(self, batch: dict[str, Any], resolution: int, mode: str) -> Optional[torch.Tensor]:
        """Extra conditioning rows (2B, ...) of a batch of pairs, winner rows then loser rows, built from the
        batch's `original_size` / `crop_top_left` / `indices`; None when the family needs none."""
        return None

    def draw_items(self, cfg: Any, epochs: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """draw_randomness for the items (pairs or single images) of a batch, each from its own generator seeded
        by (train.seed, epoch, index): independent of batch size, processes and resume. `cfg`: the RunConfig."""
        gens = [pair_generator(cfg.train.seed, int(e), int(i)) for e, i in zip(epochs, indices)]
        lo, hi = cfg.train.timestep_range
        return self.draw_randomness(gens, self.latent_shape(cfg.data.resolution), lo,
                                    min(hi, self.spec.num_train_timesteps), cfg.data.caption_dropout)

    def draw_randomness(self, generators: list[torch.Generator], latent_shape: tuple[int, ...], t_low: int,
                        t_high: int, caption_dropout: float) -> dict[str, torch.Tensor]:
        """Per-pair draws from the pairs' own generators (models.diffusion.draw_pair_randomness)."""
        return draw_pair_randomness(generators, latent_shape, t_low, t_high, caption_dropout)

    @abstractmethod
    def noisy_and_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents, noise (N, C, h, w), timesteps (N,) -> noisy network input and training target, both (N, C, h, w)."""

    def check_settings(self, cfg: Any) -> None:
        """Refuse run settings this family cannot honour (ConfigError naming the key), at setup. `cfg`: RunConfig."""

    def draw_settings(self) -> dict[str, Any]:
        """Settings beyond the run's seed, timestep range and caption dropout that decide the per-pair draws and the
        errors (the stored reference errors' key): none for the UNet families; the flow families' `flow` section."""
        return {}

    def error_weight(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample weights (N,) of the squared errors at these timesteps (flow.loss_weighting); None: weight 1."""
        return None

    @property
    def has_guidance_embedding(self) -> bool:
        """The network takes the guidance scale as an input (a latent consistency UNet's time_cond_proj_dim)."""
        return self.spec.time_cond_proj_dim is not None

    @abstractmethod
    def predict(self, net, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                pair_cond: Optional[torch.Tensor], guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward of `net` (policy or reference) on N rows; `pair_cond`: pair_conditioning's rows (or a slice);
        `guidance`: per-row guidance scales (N,) for a network with a guidance embedding (default: the family's
        guidance_scale; pipeline convention, embedded as (scale - 1) * 1000)."""
