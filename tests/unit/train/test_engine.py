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


def _train(**values) -> TrainConfig:
    return TrainConfig(**{"batch_size": 2, "gradient_accumulation": 4, "max_grad_norm": 0.5, **values})


AUTO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}  # what zero2.yaml gives accelerate's plugin


def test_deepspeed_config_takes_batch_accumulation_and_clipping_from_the_training_config():
    ds = engine.deepspeed_config(AUTO, _train(), processes=8)
    assert ds["train_micro_batch_size_per_gpu"] == 2  # train.batch_size is per process, as DeepSpeed's micro batch
    assert ds["gradient_accumulation_steps"] == 4  # DeepSpeed divides the loss by it and steps at its boundary
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_clipping"] == 0.5  # DeepSpeed clips; the trainer does not clip again
    assert AUTO["gradient_clipping"] == "auto"  # the launch's dict is not modified
    assert "bf16" not in ds and "stage3_gather_16bit_weights_on_model_save" not in ds["zero_optimization"]


def test_deepspeed_config_without_clipping_bf16_and_zero3():
    ds = engine.deepspeed_config({**AUTO, "zero_optimization": {"stage": 3}},
                                 _train(max_grad_norm=None, mixed_precision="bf16"), processes=2)
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    assert ds["bf16"]["check_grad_overflow"] is True  # a non-finite bf16 gradient skips the step (train.on_nonfinite)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # the consolidated export


def test_a_deepspeed_config_file_may_repeat_what_the_training_config_says():
    ds = engine.deepspeed_config({**AUTO, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2},
                                 _train(), processes=1)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 8)


@pytest.mark.fault(input="a DeepSpeed config file whose gradient_accumulation_steps (or micro batch, clipping) differs "
                         "from the training config's",
                   behaviour="ConfigError (exit 2): one line naming the key, both values and 'auto'")
def test_a_deepspeed_config_file_that_disagrees_is_refused():
    with pytest.raises(ConfigError, match=r"sets gradient_accumulation_steps: 8, the training config means 4: .*'auto'"):
        engine.deepspeed_config({**AUTO, "gradient_accumulation_steps": 8}, _train(), processes=1)


@pytest.mark.fault(input="a DeepSpeed config file with its own optimizer (or scheduler)",
                   behaviour="ConfigError (exit 2): one line saying to remove it; train builds its own from train.optimizer")
def test_a_deepspeed_config_file_with_an_optimizer_is_refused():
    with pytest.raises(ConfigError, match=r"sets its own 'optimizer': remove it .*train\.optimizer"):
        engine.deepspeed_config({**AUTO, "optimizer": {"type": "AdamW"}}, _train(), processes=1)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
@pytest.mark.fault(input="`train --check-launch configs/accelerate/zero2.yaml` without deepspeed installed (where "
                         "`accelerate launch` itself stops with a traceback)",
                   behaviour="exit 2: the same one line naming `pip install 'diffusion-dpo[deepspeed]'`")
def test_check_launch_names_the_missing_deepspeed(monkeypatch, capsys):
    from diffusion_dpo.cli import main

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert main(["train", "--check-launch", str(CONFIGS / "zero2.yaml")]) == 2
    assert "pip install 'diffusion-dpo[deepspeed]'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_check_launch_accepts_a_config_that_needs_nothing_more(monkeypatch, capsys):
    from diffusion_dpo.cli import main

    assert main(["train", "--check-launch", str(CONFIGS / "fsdp.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith("FSDP can be launched here")


def _under_deepspeed():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)


def test_deepspeed_gets_the_undivided_loss_and_a_nonfinite_one_poisons_every_gradient():
    import torch

    acc = _under_deepspeed()
    w = torch.nn.Parameter(torch.ones(3))
    loss = (w * 2).sum()
    assert engine.backward_loss(acc, loss, 4) is loss  # DeepSpeed divides by gradient_accumulation_steps itself
    # an infinite loss whose gradient is finite (2 per entry): DeepSpeed would apply that step before the trainer
    # sees the metrics; x NaN makes every gradient NaN, which DeepSpeed's overflow check skips on all processes
    engine.backward_loss(acc, (w * 2).sum() + float("inf"), 4).backward()
    assert torch.isnan(w.grad).all()


class _Engine:
    """What step_outcome reads of a DeepSpeedEngine after the step's last backward."""

    def __init__(self, applied: bool, norm, fp16: bool = False):
        self.applied, self.norm, self.fp16 = applied, norm, fp16

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return self.norm

    def fp16_enabled(self):
        return self.fp16


class _Schedule:
    steps = 0

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("ds, metrics, expected, schedule_steps", [
    (_Engine(True, 0.75), {"loss": 0.5}, (0.75, "applied"), 1),
    (_Engine(False, float("inf")), {"loss": 0.5}, (float("inf"), "nonfinite"), 0),  # bf16 / fp32: non-finite gradient
    (_Engine(False, float("inf"), fp16=True), {"loss": 0.5}, (float("inf"), "overflow"), 0),  # fp16 loss scaling
    (_Engine(False, float("nan")), {"loss": float("nan")}, (float("nan"), "nonfinite"), 0),  # poisoned by backward_loss
])
def test_deepspeed_step_outcome_is_what_apply_gradients_reports(ds, metrics, expected, schedule_steps):
    import math

    schedule = _Schedule()
    norm, outcome = engine.step_outcome(ds, schedule, metrics)
    assert outcome == expected[1] and (norm == expected[0] or math.isnan(norm) and math.isnan(expected[0]))
    assert schedule.steps == schedule_steps  # a skipped update does not advance the LR schedule
