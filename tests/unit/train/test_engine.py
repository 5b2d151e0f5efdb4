"""The shipped accelerate configs (configs/accelerate/*.yaml) and train.engine's refusals, without launching."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from diffusion_dpo.config import TrainConfig
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.train import engine

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "accelerate"


def test_every_shipped_accelerate_config_loads_with_its_engine():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    found = {p.name: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert {name: cfg.distributed_type for name, cfg in found.items()} == {
        "ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP,
        "zero2.yaml": DistributedType.DEEPSPEED, "zero3.yaml": DistributedType.DEEPSPEED}
    fsdp = found["fsdp.yaml"].fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    # the network's own _no_split_modules decide the wrapped blocks: one file for every family
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert fsdp["fsdp_activation_checkpointing"] is False  # refused by train.engine: train.gradient_checkpointing
    assert [found[f"zero{s}.yaml"].deepspeed_config["zero_stage"] for s in (2, 3)] == [2, 3]
    # the training config owns precision: every file leaves it off
    assert {cfg.mixed_precision for cfg in found.values()} == {"no"}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
@pytest.mark.fault(input="a DeepSpeed launch (zero2.yaml / zero3.yaml) without deepspeed installed",
                   behaviour="ConfigError (exit 2): one line naming `pip install 'diffusion-dpo[deepspeed]'`")
def test_deepspeed_launch_without_deepspeed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"deepspeed is not installed: pip install 'diffusion-dpo\[deepspeed\]'"):
        engine.build_accelerator(TrainConfig(), None, "unused")
