"""The distributed engine a launch chose, and the few things training does differently under it.

`accelerate launch --config_file configs/accelerate/<name>.yaml` picks the engine (docs/scaling.md): ddp.yaml
(DDP: everything replicated), fsdp.yaml (FSDP2: torch's fully_shard, parameters, gradients and optimizer state
sharded). The trainer asks this module and never reads accelerate's distributed type itself:

- build_accelerator: the Accelerator of this launch; refuses launches that would train wrongly, and turns FSDP2
  on for CPU processes (accelerate enables FSDP only on accelerators; torch's fully_shard runs on a CPU mesh with
  gloo, which is how the FSDP tests run);
- shard_frozen: the frozen reference copy of full fine-tuning, sharded the same way as the policy (no optimizer);
- save_sharded / load_sharded: the trainable weights and optimizer state of a checkpoint, written by every
  process as its own shard (torch.distributed.checkpoint) and read back into the sharded model, exactly;
- consolidate: the full tensors of a sharded model on the main process, for the final LoRA file or unet/ folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

from diffusion_dpo.errors import CheckpointError, ConfigError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def build_accelerator(mixed_precision: str, log_with: Optional[str], project_dir: str):
    """The Accelerator of this process, configured by the launcher's environment (accelerate launch --config_file)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("this launch asks for DeepSpeed (zero2.yaml / zero3.yaml) but deepspeed is not installed: "
                              "pip install 'diffusion-dpo[deepspeed]' (CUDA machines), or launch with "
                              "configs/accelerate/fsdp.yaml")
        raise ConfigError("DeepSpeed ZeRO (zero2.yaml / zero3.yaml) is not supported by `train` yet: launch with "
                          "configs/accelerate/fsdp.yaml, which shards the same state (docs/scaling.md)")
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
    acc = Accelerator(mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
                      fsdp_plugin=fsdp_plugin)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
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
    return acc


def is_sharded(acc) -> bool:
    """The policy's parameters are DTensor shards (FSDP2): checkpoints and outputs go through this module."""
    return acc.is_fsdp2


def name(acc) -> str:
    """'fsdp2', 'ddp' or 'single': logged at setup and written to trainer_state.json."""
    if acc.is_fsdp2:
        return "fsdp2"
    return "ddp" if acc.num_processes > 1 else "single"


def check_config(acc, reference_on_cpu: bool) -> None:
    if is_sharded(acc) and reference_on_cpu:
        raise ConfigError("model.reference_on_cpu does not apply under FSDP (the reference is sharded like the "
                          "policy): remove it, or set fsdp_offload_params: true in the accelerate config")


def shard_frozen(acc, module: torch.nn.Module) -> torch.nn.Module:
    """fully_shard a frozen network with the launch's wrap policy and mixed precision (the policy's own path in
    accelerate, which upcasts only trainable parameters: the reference keeps model.reference_dtype)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(acc, module)


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints. Only trainable tensors are stored (LoRA: the adapters; the frozen base is in the model
# folder), as in the single-file checkpoints of train.checkpoint.


def _trainable_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in trainable}


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every process writes its shard of the trainable weights and of the optimizer state into `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer.optimizer)}
    dcp.save(state, checkpoint_id=str(folder))


def check_sharded(folder: Path) -> None:
    """Raises CheckpointError when the shard index cannot be read (before anything is loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # a missing or truncated .metadata makes the whole checkpoint unusable
        why = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{folder} cannot be read ({type(err).__name__}: {why})") from err


def load_sharded(folder: Path, model, optimizer) -> None:
    """Read the shards of `folder` into the sharded model and optimizer (resharded if the world size changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": _trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer.optimizer)}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as err:  # a key or shape the checkpoint lacks: written with other trainable tensors
        why = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"checkpoint {folder.parent} does not fit this model ({why}): use the checkpoint's "
                          "train.finetune / lora settings, or train into a new output.dir") from err
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer.optimizer, state["optimizer"])


# ----------------------------------------------------------------------------------------------
# Consolidated export


def consolidate(model, is_main: bool, trainable_only: bool) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU tensors of the model's state dict on the main process (None elsewhere). Every process must call it
    (each tensor is all-gathered in turn). trainable_only: the LoRA adapters, not the frozen base."""
    from torch.distributed.tensor import DTensor

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = {}
    for key, tensor in model.state_dict().items():
        if trainable_only and key not in trainable:
            continue
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if is_main:
            full[key] = tensor.detach().to("cpu").contiguous()
    return full if is_main else None


def unsharded_copy(model, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain module of the class fully_shard replaced, holding `state` (no second copy of the weights is built)."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls.from_config(model.config)
    plain.load_state_dict(state, assign=True)
    return plain.eval()
