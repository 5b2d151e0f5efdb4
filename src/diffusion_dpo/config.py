"""Typed configuration: dataclasses are the schema, YAML files and dotted overrides fill them.

    cfg = load_config("configs/sd15_dpo.yaml", ["train.beta=5000", "lora.rank=16"])

Unknown keys and values of the wrong type raise ConfigError naming the exact key. The resolved
config is written next to every output (`save_config`) so a run can always be reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.flow_config import FlowConfig
from diffusion_dpo.loss_config import LOSS_KEYS, LossConfig, validate_loss
from diffusion_dpo.typed_config import apply_override, from_dict, load_typed, save_yaml, to_dict


@dataclass
class ModelConfig:
    pretrained: str = ""
    """Hub id or local folder of a diffusers pipeline (model_index.json, unet/, vae/, text_encoder/ ...)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of `pretrained`."""
    variant: Optional[str] = None
    """Weight variant to load, e.g. 'fp16' for *.fp16.safetensors."""
    family: Literal["auto", "sd", "sdxl", "lcm", "sd3", "flux"] = "auto"
    """Model family; 'auto' detects it from the pipeline folder."""
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    """Override the scheduler's prediction type (default: read from scheduler/scheduler_config.json)."""
    vae: Optional[str] = None
    """Optional separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix."""
    frozen_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the frozen VAE and text encoders (and of a frozen reference copy, unless reference_dtype is set)."""
    reference_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    """dtype of the frozen reference UNet for full fine-tuning (default: frozen_dtype)."""
    reference_on_cpu: bool = False
    """Full fine-tuning only: keep the frozen reference UNet on the CPU and move it per step (saves GPU memory)."""
    lcm_guidance_scale: float = 8.0
    """LCM UNets only: guidance scale fed through the guidance embedding (time_cond_proj_dim)."""
    teacher: Optional[str] = None
    """consistency_dpo only (required there): the frozen teacher's pipeline folder or hub id (its UNet is used)."""


@dataclass
class DataConfig:
    source: str = ""
    """Hub dataset id, parquet file or glob, saved `datasets` folder, JSONL/CSV manifest, folder pair, or a prepared cache folder."""
    format: Literal["auto", "pickapic", "manifest", "labelled", "folders", "cache"] = "auto"
    """How to read `source`; 'auto' decides from what it points at. 'labelled': a manifest of (prompt, image, label)
    single images (auto picks it for a manifest with image and label columns); only train.method=kto trains on them."""
    unpair: bool = False
    """Turn each pair into two labelled single images, the winner desirable and the loser undesirable, each with its
    own noise and timestep (Diffusion-KTO's per-image training); only train.method=kto trains on them."""
    split: str = "train"
    """Split to read from a hub dataset or a saved DatasetDict."""
    resolution: int = 512
    """Training resolution in pixels (images are resized and cropped to a square of this size)."""
    crop: Literal["center", "random"] = "center"
    """Crop after resizing the short side to `resolution`."""
    random_flip: bool = False
    """Randomly flip images horizontally."""
    shared_transforms: bool = False
    """Apply the same random crop and flip to both images of a pair. The official code draws them independently (False).
    SDXL with sdxl_time_ids='pair' always shares the crop position (it is conditioning); this key then decides the flip."""
    sdxl_time_ids: Literal["pair", "image"] = "pair"
    """SDXL size/crop conditioning. 'pair' (as diffusers' DPO script): the loser is resized to the winner's size and
    cropped at the same place, and one time-id row serves both, so a pair differs only in its image, as the DPO
    derivation assumes. 'image': each image's own original size and crop. Ignored by other families. See docs/data.md."""
    caption_dropout: float = 0.0
    """Probability, per pair, of replacing the prompt with the empty string (paper: 0.2); in [0, 1)."""
    drop_ties: bool = True
    """Drop tied pairs (label 0.5) and count them. Setting False is an error for tie labels: a tie has no winner."""
    on_corrupt: Literal["skip", "error"] = "skip"
    """A corrupt or missing image: skip its pair and count it ('skip'), or stop with an error ('error')."""
    max_pairs: Optional[int] = None
    """Use at most this many pairs (after dropping ties), for quick runs; >= 1 (null: all)."""
    prompts_file: Optional[str] = None
    """Folder format: prompts file (JSONL lines {"name", "prompt"}, a JSON {name: prompt}, or 'name<TAB>prompt' lines);
    a relative path is looked up in data.source first. Default: prompts.jsonl / .json / .txt / .tsv inside the folder."""
    num_workers: int = 0
    """DataLoader worker processes (>= 0; 0 loads in the training process)."""
    cache_dir: Optional[str] = None
    """Where `prepare` writes (and `train` looks for) a latent cache; None: encode on the fly."""
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of latents and embeddings in a cache prepared on the fly (data.cache_dir)."""
    latent_sampling: Literal["sample", "mean"] = "sample"
    """From a cache: draw latents from the stored VAE distribution like the official code ('sample') or use its mean."""


# The LCM-LoRA target set (diffusers' train_lcm_distill_lora_sd_wds.py; Curriculum-DPO's LCM runs)
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class LoraSettings:
    rank: int = 8
    """LoRA rank r."""
    alpha: Optional[float] = None
    """LoRA alpha, > 0 (default: equal to rank, i.e. scale 1; 0 would switch the adapter off)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: Optional[list[str]] = None
    """Module names of the trained network that receive an adapter. Default (unset or null): the family's set,
    resolved once the family is detected (RunConfig.with_network_defaults; table in docs/recipes.md, "LoRA targets");
    with train.method=consistency_dpo: LCM_LORA_TARGETS."""
    init_weights: Literal["default", "gaussian"] = "default"
    """'default' starts the B matrices at zero, so the policy begins exactly at the reference."""
    export_kohya: bool = False
    """Also write the LoRA in the kohya / A1111 / ComfyUI key format (lora_unet_*)."""


@dataclass
class CurriculumConfig:
    """Curriculum-DPO's easy-to-hard levels of pairs (arXiv 2405.13637), the ++ paper's LoRA rank growth: docs/curriculum.md."""

    enabled: bool = False
    """Order the pairs by the curriculum (off: every pair from the start, as plain DPO)."""
    difficulty: Literal["rank_difference", "score_gap"] = "rank_difference"
    """'rank_difference' (paper): the data's rank_difference among images_per_prompt M (generate-pairs --strategy
    all-ranked), level k = ((M-1)(B-k)/B, (M-1)(B-k+1)/B]. 'score_gap' (code): margin in `levels` equal-width bins."""
    levels: int = 5
    """B, the number of difficulty levels, >= 1 (paper and code: 5)."""
    steps_per_level: int = 400
    """K, optimizer steps before the next level is added, >= 1 (paper: 400; code: 500)."""
    rank_schedule: Optional[list[int]] = None
    """Curriculum-DPO++ (LoRA): level k's rank, increasing to lora.rank, <= `levels` entries, e.g. [2, 4, 8] (null: off)."""


@dataclass
class TrainConfig:
    method: Literal["dpo", "sft", "ipo", "hinge", "cdpo", "rdpo", "kto", "mapo", "simpo", "consistency_dpo"] = "dpo"
    """The loss: 'dpo' Diffusion-DPO (Wallace et al. 2024, eq. 14); 'sft' diffusion loss on the preferred image only;
    'ipo', 'hinge', 'cdpo', 'rdpo', 'kto' (reference-based); 'mapo', 'simpo' (reference-free); 'consistency_dpo'
    (latent consistency models, needs model.teacher). Its settings are the loss.* keys; docs/losses.md has each formula."""
    beta: float = 2000.0
    """DPO temperature. With error_reduction='mean' (official code) the effective temperature is beta/(2*C*H*W). See docs/losses.md."""
    error_reduction: Literal["mean", "sum"] = "mean"
    """Per-sample error: mean over C,H,W (official code, default) or sum (the paper's pseudocode)."""
    finetune: Literal["lora", "full"] = "lora"
    learning_rate: float = 1e-5
    """Peak learning rate, > 0, used as given (no scaling by batch size). See docs/recipes.md for the paper's
    numbers."""
    scale_lr: bool = False
    """Multiply learning_rate by batch_size * gradient_accumulation * num_processes (the official launchers' convention)."""
    batch_size: int = 1
    """Pairs per device per micro-batch."""
    gradient_accumulation: int = 1
    max_steps: int = 2000
    """Optimizer steps."""
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    adam_beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    adam_beta2: float = 0.999
    """AdamW beta2, in [0, 1)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon, >= 0."""
    weight_decay: float = 1e-2
    """Decoupled weight decay, >= 0."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value, > 0 (None: no clipping; a negative value would flip the
    gradient's sign)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    """Linear warm-up steps, >= 0 (schedules with warm-up only)."""
    warmup_ratio: Optional[float] = None
    """Warm-up as a fraction of max_steps (overrides warmup_steps), e.g. 0.25 for the paper's SD1.5 run."""
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    lean_autograd: bool = True
    """Keep fewer activations for backward with bit-identical gradients: frozen convolutions keep no input, GEGLU
    recomputes its GELU, GroupNorm+SiLU and LayerNorm+LoRA recompute the norm (models/lean_autograd.py)."""
    allow_tf32: bool = True
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N optimizer steps, >= 0 (0: only at the end)."""
    checkpoints_total_limit: Optional[int] = 3
    """Keep at most this many checkpoints, >= 1 (oldest removed first; None: keep all)."""
    resume: Literal["auto", "never", "force"] = "auto"
    """'auto': continue from the latest checkpoint in output.dir if there is one, refused if a setting that
    determines the result differs from the checkpoint's; 'force': continue even then (recorded in config.yaml,
    train_summary.json and the model card); 'never': start from scratch (refused if output.dir holds checkpoints).
    See docs/recipes.md for which settings may change on a resume."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop the run with an error ('stop') or skip that optimizer step and log it ('skip')."""
    timestep_range: tuple[int, int] = (0, 1000)
    """Timesteps are drawn uniformly from [low, high) (clipped to the scheduler's num_train_timesteps)."""
    log_every: int = 1
    """Send metrics to the tracker every N optimizer steps, >= 1 (metrics.jsonl gets every step)."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Curriculum-DPO's easy-to-hard order of pairs (off by default)."""
    reference: Optional[Literal["live", "cached", "none"]] = None
    """Where the reference errors come from. 'live': a reference forward in every step (default for losses that
    use a reference); 'cached': computed once per pair and epoch of per-pair randomness (reference_epochs) before
    training and stored beside the latent cache, so a step runs the policy only (needs a prepared cache:
    data.cache_dir or data.format=cache); 'none': no reference at all (only, and by default, for the
    reference-free losses sft, mapo, simpo). See docs/losses.md, "Reference strategies"."""
    reference_epochs: int = 1
    """train.reference=cached: epochs of per-pair randomness (noise, timestep, caption dropout, latent sampling)
    whose reference errors are stored, >= 1. Epoch e >= this reuses the draws of epoch e mod reference_epochs."""


# The losses that use no reference model (losses.LOSSES[m].needs_reference is False; a test keeps the two in step).
REFERENCE_FREE = ("sft", "mapo", "simpo")


def reference_strategy(train: TrainConfig) -> str:
    """train.reference with its default resolved: 'none' for a reference-free loss, else 'live'."""
    if train.reference is not None:
        return train.reference
    return "none" if train.method in REFERENCE_FREE else "live"


def _validate_reference(t: TrainConfig) -> None:
    free = t.method in REFERENCE_FREE
    if t.reference == "none" and not free:
        raise ConfigError(f"train.reference=none needs a reference-free loss ({', '.join(REFERENCE_FREE)}), but "
                          f"train.method {t.method!r} compares with the reference: use train.reference=live or cached")
    if t.reference in ("live", "cached") and free:
        raise ConfigError(f"train.reference={t.reference} but train.method {t.method!r} uses no reference: remove "
                          "train.reference (it is 'none' for this loss) or choose a loss that uses one")
    if t.reference_epochs < 1:
        raise ConfigError(f"train.reference_epochs must be >= 1, got {t.reference_epochs}")


def _validate_teacher(t: TrainConfig, m: ModelConfig) -> None:
    """consistency_dpo: a teacher, a live reference, no explicit non-LCM family (an auto-detected one: at setup)."""
    if t.method != "consistency_dpo":
        if m.teacher is not None:
            raise ConfigError(f"model.teacher is set but train.method {t.method!r} does not use it (only "
                              "consistency_dpo does): remove model.teacher or set train.method=consistency_dpo")
        return
    if not m.teacher:
        raise ConfigError("train.method=consistency_dpo needs model.teacher: set it to the teacher's diffusers "
                          "pipeline folder or hub id (e.g. the SD model the LCM was distilled from)")
    if m.family not in ("auto", "lcm"):
        raise ConfigError(f"train.method=consistency_dpo trains a latent consistency model, but model.family is "
                          f"{m.family!r}: set model.family=lcm (or auto) with an LCM pipeline, or choose another method")
    if t.reference not in (None, "live"):
        raise ConfigError(f"train.reference={t.reference} is not supported by train.method=consistency_dpo (its "
                          "reference distances need the reference's own target each step): use train.reference=live")


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    report_to: Literal["none", "tensorboard", "wandb", "auto"] = "auto"
    """'auto': TensorBoard if installed, else only metrics.jsonl."""
    save_full_pipeline: bool = False
    """Full fine-tuning: also write a complete pipeline folder (not only unet/)."""
    push_to_hub: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def with_network_defaults(self, family_lora_targets: tuple[str, ...]) -> "RunConfig":
        """This config with the defaults that depend on the trained network filled in where it leaves them unset:
        lora.target_modules is consistency_dpo's LCM-LoRA set, else the detected family's `lora_targets`.
        Trainer.setup applies it before the run folder compares configs, so a resume, config.yaml, checkpoints and
        the model card see the list that is trained (the UNet families' set is the list older runs recorded)."""
        if self.lora.target_modules is not None:
            return self
        targets = LCM_LORA_TARGETS if self.train.method == "consistency_dpo" else family_lora_targets
        return replace(self, lora=replace(self.lora, target_modules=list(targets)))

    def validate(self) -> None:
        """Cross-field checks; raise ConfigError naming the key and the fix."""
        t, d = self.train, self.data
        if t.beta <= 0 and t.method not in ("sft", "mapo"):  # the losses that read beta
            raise ConfigError(f"train.beta must be > 0 for method {t.method!r}, got {t.beta}")
        validate_loss(t.method, self.loss)
        _validate_reference(t)
        _validate_teacher(t, self.model)
        self.flow.validate()
        if t.curriculum.rank_schedule is not None:  # its checks live with the feature
            from diffusion_dpo.train.curriculum_model import check_config
            check_config(self)
        for key, value in (("train.batch_size", t.batch_size), ("train.gradient_accumulation", t.gradient_accumulation),
                           ("train.max_steps", t.max_steps), ("data.resolution", d.resolution), ("lora.rank", self.lora.rank)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        # values torch rejects later or that silently do nothing (a negative clip norm flips the gradient,
        # alpha 0 switches the adapter off); null keeps its documented meaning where a key allows it
        positive = (("train.learning_rate", t.learning_rate), ("train.max_grad_norm", t.max_grad_norm),
                    ("lora.alpha", self.lora.alpha), ("loss.soft_label_temperature", self.loss.soft_label_temperature))
        non_negative = (("train.adam_epsilon", t.adam_epsilon), ("train.weight_decay", t.weight_decay),
                        ("data.num_workers", d.num_workers), ("train.warmup_steps", t.warmup_steps),
                        ("train.checkpoint_every", t.checkpoint_every))
        at_least_one = (("train.checkpoints_total_limit", t.checkpoints_total_limit), ("train.log_every", t.log_every),
                        ("data.max_pairs", d.max_pairs), ("train.curriculum.levels", t.curriculum.levels),
                        ("train.curriculum.steps_per_level", t.curriculum.steps_per_level))
        for bound, pairs, ok in (("> 0", positive, lambda v: v > 0), (">= 0", non_negative, lambda v: v >= 0),
                                 (">= 1", at_least_one, lambda v: v >= 1)):
            for key, value in pairs:
                if value is not None and not ok(value):
                    raise ConfigError(f"{key} must be {bound}, got {value}")
        for key, value in (("lora.dropout", self.lora.dropout), ("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value}")
        if d.resolution % 8:
            raise ConfigError(f"data.resolution must be a multiple of 8 (the VAE downsamples by 8), got {d.resolution}")
        if not 0.0 <= d.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}")
        if t.warmup_ratio is not None and not 0.0 <= t.warmup_ratio <= 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1], got {t.warmup_ratio}")
        lo, hi = t.timestep_range
        if not 0 <= lo < hi:
            raise ConfigError(f"train.timestep_range must satisfy 0 <= low < high, got {t.timestep_range}")
        if self.model.reference_on_cpu and t.finetune != "full":
            raise ConfigError("model.reference_on_cpu only applies to train.finetune=full (LoRA needs no reference copy)")
        if self.model.reference_on_cpu and reference_strategy(t) != "live":
            raise ConfigError(f"model.reference_on_cpu needs train.reference=live (with {reference_strategy(t)!r} no "
                              "reference network is kept during training): remove model.reference_on_cpu")

    @property
    def warmup(self) -> int:
        if self.train.warmup_ratio is not None:
            return int(round(self.train.warmup_ratio * self.train.max_steps))
        return self.train.warmup_steps


# Reading and writing (the generic machinery is in typed_config.py)

def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema: type = RunConfig) -> Any:
    """Read YAML (optional), apply dotted overrides, build and validate the typed config."""
    return load_typed(schema, path, overrides)


def save_config(cfg: Any, path: str | Path) -> None:
    save_yaml(cfg, path)


__all__ = ["FlowConfig", "LCM_LORA_TARGETS", "ModelConfig", "DataConfig", "LoraSettings", "CurriculumConfig", "TrainConfig",
           "LossConfig", "LOSS_KEYS", "REFERENCE_FREE", "OutputConfig", "RunConfig", "reference_strategy", "load_config",
           "save_config", "from_dict", "to_dict", "apply_override"]
