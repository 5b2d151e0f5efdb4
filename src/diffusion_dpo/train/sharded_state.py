"""Checkpoints and outputs of a sharded model (FSDP2, DeepSpeed ZeRO): the engine half that reads and writes.

- save_sharded / load_sharded: the trainable weights and optimizer state of a checkpoint, written by every
  process as its own shard (torch.distributed.checkpoint, or DeepSpeed's own checkpoint) and read back exactly;
- consolidate: the full tensors of a sharded model on the main process, for the final LoRA file or network folder;
- unsharded_copy: a plain module holding consolidated tensors (what save_pretrained writes).

train.engine chooses and builds the engine; this module is what the trainer and train.checkpoint call around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from diffusion_dpo.errors import CheckpointError, ConfigError
from diffusion_dpo.train.engine import is_deepspeed

SHARDED = "sharded"  # the folder of a checkpoint written under FSDP2: one torch.distributed.checkpoint
DEEPSPEED = "deepspeed"  # the same under DeepSpeed ZeRO: its engine's save_checkpoint (one file per process)


# Sharded checkpoints. Only trainable tensors are stored (LoRA: the adapters; the frozen base is in the model
# folder), as in the single-file checkpoints of train.checkpoint.


def _trainable_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in trainable}


def checkpoint_folder(acc) -> str:
    """The folder of a checkpoint that holds the engine's shards (SHARDED or DEEPSPEED)."""
    return DEEPSPEED if is_deepspeed(acc) else SHARDED


def _engine_of(folder: Path) -> str:
    return "DeepSpeed" if folder.name == DEEPSPEED else "FSDP"


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every process writes its shard of the trainable weights and of the optimizer state into `folder`.
    model: the prepared model (under DeepSpeed its engine, which writes its own checkpoint format)."""
    if type(model).__name__ == "DeepSpeedEngine":
        # the frozen base (LoRA) stays out, as in every other checkpoint; the LR schedule is the trainer's
        model.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False, exclude_frozen_parameters=True)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer.optimizer)}
    dcp.save(state, checkpoint_id=str(folder))


def check_sharded(folder: Path) -> None:
    """Raises CheckpointError when the shard index cannot be read (before anything is loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    if _engine_of(folder) == "DeepSpeed":
        if not any(folder.glob("*model_states.pt")):
            raise CheckpointError(f"{folder} cannot be read (no DeepSpeed model_states file)")
        return
    try:
        FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # a missing or truncated .metadata makes the whole checkpoint unusable
        why = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{folder} cannot be read ({type(err).__name__}: {why})") from err


def load_sharded(folder: Path, model, optimizer) -> None:
    """Read the shards of `folder` into the sharded model and optimizer (FSDP2: resharded if the world size changed).
    model: the prepared model, as for save_sharded."""
    deepspeed = type(model).__name__ == "DeepSpeedEngine"
    if _engine_of(folder) != ("DeepSpeed" if deepspeed else "FSDP"):
        here = "DeepSpeed" if deepspeed else "FSDP"
        raise ConfigError(f"checkpoint {folder.parent} was written under {_engine_of(folder)} and this run trains "
                          f"under {here}: resume with the accelerate config that wrote it, or train into a new "
                          "output.dir")
    if deepspeed:
        try:
            path, _ = model.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False,
                                            load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as err:  # another model, another process count or ZeRO stage: DeepSpeed says which
            why = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"checkpoint {folder.parent} does not fit this run ({type(err).__name__}: {why}): "
                              "resume with the checkpoint's settings and process count, or train into a new "
                              "output.dir") from err
        if path is None:
            raise CheckpointError(f"{folder} cannot be read by DeepSpeed")
        return
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


def consolidate(acc, model, trainable_only: bool) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU tensors of the model's state dict on the main process (None elsewhere). Every process must call it
    (each tensor is all-gathered in turn). model: the prepared model. trainable_only: the LoRA adapters, not the
    frozen base."""
    from torch.distributed.tensor import DTensor

    is_main = acc.is_main_process
    if type(model).__name__ == "DeepSpeedEngine":
        return _consolidate_deepspeed(acc, model, is_main, trainable_only)

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


def _consolidate_deepspeed(acc, ds, is_main: bool, trainable_only: bool) -> Optional[dict[str, torch.Tensor]]:
    """The frozen tensors as the engine holds them (ZeRO-3: gathered by accelerator.get_state_dict), the trained
    ones from the optimizer's fp32 master weights (gathered under ZeRO-3): the same dtypes as a run without
    DeepSpeed exports, whatever DeepSpeed's bf16 / fp16 mode cast the network to."""
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[str, torch.Tensor] = {}
    if not trainable_only:
        state = acc.get_state_dict(ds)
        full = {k: v.detach().to("cpu").contiguous() for k, v in state.items()} if is_main else {}
    for key, param in ds.module.named_parameters():
        if param.requires_grad:
            tensor = safe_get_full_fp32_param(param)
            if is_main:
                full[key] = tensor.detach().to("cpu").contiguous()
    return full if is_main else None
