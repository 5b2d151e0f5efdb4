"""The distributed engine a launch chose, and the few things training does differently under it.

`accelerate launch --config_file configs/accelerate/<name>.yaml` picks the engine (docs/scaling.md): ddp.yaml
(DDP: everything replicated), fsdp.yaml (FSDP2: torch's fully_shard, parameters, gradients and optimizer state
sharded). The trainer asks this module and never reads accelerate's distributed type itself:

- build_accelerator: the Accelerator of this launch; refuses launches that would train wrongly, and turns FSDP2
  on for CPU processes (accelerate enables FSDP only on accelerators; torch's fully_shard runs on a CPU mesh with
  gloo, which is how the FSDP tests run);
- shard_frozen: the frozen reference copy of full fine-tuning, sharded the same way as the policy (no optimizer);
- checkpoints and the final export of a sharded model (save_sharded / load_sharded, consolidate) live in
  train/sharded_state.py.

zero2.yaml / zero3.yaml (DeepSpeed ZeRO through accelerate's integration) differ from the other two in one way the
trainer sees: DeepSpeed's engine owns the optimizer step. It divides the loss by the accumulation steps, clips, steps
and zeroes inside the last micro-batch's backward (accelerate's `accumulate` marks that boundary), and skips an
update whose gradients are not finite. The functions below (micro_batch, backward_loss, step_outcome, loss_scale)
keep the trainer's loop the same under every engine. Its DeepSpeed config is derived from the training config
(deepspeed_config): batch size, accumulation, clipping and precision are said once, in the training config.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
from typing import Optional

import torch

from diffusion_dpo.errors import ConfigError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_deepspeed_installed() -> None:
    """A DeepSpeed launch (ACCELERATE_USE_DEEPSPEED, set by zero2.yaml / zero3.yaml) needs the deepspeed package."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("this launch asks for DeepSpeed (zero2.yaml / zero3.yaml) but deepspeed is not installed: "
                          "pip install 'diffusion-dpo[deepspeed]', or launch with configs/accelerate/fsdp.yaml")


def check_launch(config_file: str) -> str:
    """`train --check-launch FILE`: what `accelerate launch --config_file FILE` would need here, checked before
    launching (accelerate's own launcher stops with a traceback when DeepSpeed is missing). Returns the engine."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        launch = load_config_from_file(config_file)
    except Exception as err:  # a missing file or a YAML / key error: accelerate's message, on one line
        why = (str(err).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"--check-launch {config_file}: not an accelerate config "
                          f"({type(err).__name__}: {why})") from err
    engine = str(launch.distributed_type).split(".")[-1]
    if engine == "DEEPSPEED":
        check_deepspeed_installed()
    return engine


def build_accelerator(train, log_with: Optional[str], project_dir: str):
    """The Accelerator of this process, configured by the launcher's environment (accelerate launch --config_file).
    train: the TrainConfig (precision; under DeepSpeed also batch size, accumulation and clipping)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    mixed_precision, launched = train.mixed_precision, int(os.environ.get("WORLD_SIZE", "1"))
    ds_plugin = None
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        check_deepspeed_installed()
        from accelerate.utils import DeepSpeedPlugin

        ds_plugin = DeepSpeedPlugin()  # every setting from the ACCELERATE_DEEPSPEED_* variables of the launch
        derived = deepspeed_config(ds_plugin.deepspeed_config, train, launched)
        ds_plugin.deepspeed_config.clear()  # in place: the plugin's HfDeepSpeedConfig reads the same dict
        ds_plugin.deepspeed_config.update(derived)
    fsdp_plugin = None
    if _env_true("ACCELERATE_USE_FSDP"):
        fsdp_plugin = FullyShardedDataParallelPlugin()  # every setting from the FSDP_* variables of the launch
        if fsdp_plugin.fsdp_version != 2:
            raise ConfigError(f"fsdp_version: {fsdp_plugin.fsdp_version} in the accelerate config: train supports "
                              "FSDP2 only; set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        if fsdp_plugin.activation_checkpointing:
            raise ConfigError("fsdp_activation_checkpointing: true in the accelerate config renames every wrapped "
                              "parameter; set it to false and use train.gradient_checkpointing=true (the same blocks)")
        if mixed_precision in ("bf16", "fp16"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # compute and all-gather in half precision; gradients reduced in float32, as DDP does under autocast
            # (beta multiplies error differences: a bf16 reduction would round the step itself)
            fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16, reduce_dtype=torch.float32)
    # under DeepSpeed, accelerate's accumulate() counts the micro-batches and marks the step's last one
    acc = Accelerator(mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
                      fsdp_plugin=fsdp_plugin, deepspeed_plugin=ds_plugin,
                      gradient_accumulation_steps=train.gradient_accumulation if ds_plugin else 1)
    if launched > 1 and acc.num_processes == 1:
        raise ConfigError(f"{launched} processes were launched but accelerate found no GPU and set each up as a single "
                          "process (they would train separately into one output.dir): set ACCELERATE_USE_CPU=true "
                          "for a CPU run")
    if fsdp_plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        # accelerate resolves CPU processes to DDP and ignores the plugin; fully_shard itself runs on a CPU mesh.
        # Set what accelerate's own FSDP branch sets (AcceleratorState init): the plugin, and the distributed type
        # in both shared states (every later AcceleratorState() copies PartialState's over its own)
        acc.state.fsdp_plugin = fsdp_plugin
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if ds_plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        # The same for DeepSpeed: accelerate enables it only off the CPU (AcceleratorState init, `not cpu`), while
        # DeepSpeed's CPU accelerator runs ZeRO over the gloo group accelerate initialised. Set what that branch sets
        ds_plugin.set_mixed_precision(mixed_precision)
        ds_plugin.select(_from_accelerator_state=True)
        acc.state.deepspeed_plugins = ds_plugin
        acc.state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    if ds_plugin is not None:
        # A selected ZeRO-3 plugin makes transformers build every from_pretrained model under deepspeed.zero.Init
        # (partitioned as it is created). The frozen text encoders run outside DeepSpeed and must stay whole; the
        # trained network is partitioned when prepared (deepspeed.initialize), the reference by shard_frozen
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return acc


def deepspeed_config(base: dict, train, processes: int) -> dict:
    """The DeepSpeed config of a launch: the accelerate file's (ZeRO stage, offload) with what the training config
    says filled in. A value the file sets itself (a deepspeed_config_file) must agree with ours; an optimizer or
    scheduler in it is refused (train passes its own: train.optimizer, train.lr_scheduler)."""
    cfg = copy.deepcopy(base)
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"the DeepSpeed config sets its own {key!r}: remove it (train builds its own from "
                              f"train.{'optimizer' if key == 'optimizer' else 'lr_scheduler'})")
    ours = {"train_micro_batch_size_per_gpu": train.batch_size,
            "gradient_accumulation_steps": train.gradient_accumulation,
            "train_batch_size": train.batch_size * train.gradient_accumulation * processes,
            "gradient_clipping": float(train.max_grad_norm or 0.0)}  # 0: no clipping
    for key, value in ours.items():
        given = cfg.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}: {given}, the training config means {value}: set it "
                              "to 'auto' (the training config decides: train.batch_size, train.gradient_accumulation, "
                              "train.max_grad_norm)")
        cfg[key] = value
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # the consolidated export gathers the sharded weights (accelerator.get_state_dict)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.mixed_precision == "bf16":  # a non-finite bf16 gradient skips the update, as fp32 and fp16 do
        cfg.setdefault("bf16", {})["check_grad_overflow"] = True
    return cfg


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(acc) -> int:
    return int(acc.state.deepspeed_plugin.zero_stage)


def is_sharded(acc) -> bool:
    """The engine holds the policy's training state in shards (FSDP2, DeepSpeed ZeRO): checkpoints and outputs go
    through this module."""
    return acc.is_fsdp2 or is_deepspeed(acc)


def name(acc) -> str:
    """'fsdp2', 'deepspeed-zero<stage>', 'ddp' or 'single': logged at setup and written to train_summary.json."""
    if acc.is_fsdp2:
        return "fsdp2"
    if is_deepspeed(acc):
        return f"deepspeed-zero{_zero_stage(acc)}"
    return "ddp" if acc.num_processes > 1 else "single"


def _shards_reference(acc) -> bool:
    return acc.is_fsdp2 or (is_deepspeed(acc) and _zero_stage(acc) == 3)


def check_config(acc, reference_on_cpu: bool) -> None:
    if _shards_reference(acc) and reference_on_cpu:
        raise ConfigError(f"model.reference_on_cpu does not apply under {name(acc)} (the reference is sharded like "
                          "the policy): remove it, or offload both networks in the accelerate config "
                          "(fsdp_offload_params / offload_param_device)")


def shard_frozen(acc, module: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference of full fine-tuning, placed like the policy. FSDP2: fully_shard with the launch's wrap
    policy and mixed precision (accelerate's own path, which upcasts only trainable parameters: the reference keeps
    model.reference_dtype). ZeRO-3: an engine of its own without optimizer, its parameters partitioned over the
    processes as the policy's (as TRL places its reference models). ZeRO-1/2 replicate parameters: kept whole."""
    if acc.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(acc, module)
    if _zero_stage(acc) != 3:
        return module.to(acc.device)
    import deepspeed

    policy = acc.state.deepspeed_plugin.deepspeed_config
    dtype = next(module.parameters()).dtype
    config = {"train_micro_batch_size_per_gpu": policy["train_micro_batch_size_per_gpu"],
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    reference = deepspeed.initialize(model=module, config=config)[0]
    reference.eval()  # DeepSpeedEngine.eval returns None
    return reference


@contextlib.contextmanager
def micro_batch(acc, model, last: bool):
    """One micro-batch of a step; `last`: the step's final one, where gradients are reduced (and, under DeepSpeed,
    applied inside backward). DDP and FSDP2 defer the reduction with no_sync; under DeepSpeed accelerate's accumulate
    tells the engine where the boundary is."""
    if not is_deepspeed(acc):
        with contextlib.nullcontext() if last else acc.no_sync(model):
            yield
        return
    with acc.accumulate(model):
        if acc.sync_gradients != last:  # accelerate counts micro-batches itself: it must agree with the trainer
            raise RuntimeError(f"accelerate's accumulation boundary ({acc.sync_gradients}) is not the trainer's "
                               f"({last})")
        yield


def backward_loss(acc, loss: torch.Tensor, accumulation: int) -> torch.Tensor:
    """What to pass to accelerator.backward for a micro-batch's mean loss. DeepSpeed divides by the accumulation
    steps itself; and it applies the update inside the last backward, before the trainer sees the step's metrics,
    so a non-finite loss is made to give non-finite gradients (x NaN), which DeepSpeed's overflow check skips on
    every process, as the trainer skips such a step elsewhere (train.on_nonfinite)."""
    if not is_deepspeed(acc):
        return loss / accumulation
    return loss if torch.isfinite(loss.detach()).all() else loss * float("nan")


def autocast(acc):
    """The forward's autocast. accelerate gives none under DeepSpeed (its engine casts the network to bf16 / fp16,
    keeping fp32 masters in the optimizer); autocast still casts the fp32 inputs for the half-precision layers."""
    if is_deepspeed(acc):
        ds = acc.state.deepspeed_plugin.deepspeed_config
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if ds.get(key, {}).get("enabled") is True:
                return torch.autocast(acc.device.type, dtype=dtype)
    return acc.autocast()


def step_outcome(ds, lr_scheduler, metrics: dict[str, float]) -> tuple[float, str]:
    """Under DeepSpeed, what its engine `ds` did at the step's last backward (clipped and stepped, or skipped
    non-finite gradients): (grad norm before clipping, outcome) as train.optim.apply_gradients returns them."""
    norm = ds.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None else float("nan")
    if not all(math.isfinite(v) for v in metrics.values()):
        return float("nan"), "nonfinite"
    if ds.was_step_applied():
        lr_scheduler.step()  # as apply_gradients: a skipped update does not advance the schedule
        return grad_norm, "applied"
    return grad_norm, "overflow" if ds.fp16_enabled() else "nonfinite"


def loss_scale(acc, model) -> Optional[float]:
    """The fp16 loss scale (GradScaler, or DeepSpeed's own loss scaler), None without fp16."""
    if acc.scaler is not None:
        return acc.scaler.get_scale()
    if is_deepspeed(acc) and model.fp16_enabled():
        return float(model.optimizer.loss_scale)
    return None
