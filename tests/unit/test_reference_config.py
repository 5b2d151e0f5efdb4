"""train.reference: defaults per loss, what each loss may use, and the table kept in step with the losses."""

from __future__ import annotations

import pytest

from diffusion_dpo.config import REFERENCE_FREE, load_config, reference_strategy
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses import LOSSES


def test_reference_free_table_matches_the_losses():
    assert set(REFERENCE_FREE) == {name for name, cls in LOSSES.items() if not cls.needs_reference}


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_default_is_none_for_reference_free_losses_and_live_for_the_others(method):
    teacher = ["model.teacher=t"] if method == "consistency_dpo" else []  # required by that method
    cfg = load_config(None, [f"train.method={method}", *teacher])
    assert cfg.train.reference is None  # unset stays unset in config.yaml (resumes of older runs match)
    assert reference_strategy(cfg.train) == ("none" if method in REFERENCE_FREE else "live")


@pytest.mark.fault(input="`train.reference=none` with a loss that uses a reference (dpo, ipo, ...)",
                   behaviour="config error naming the reference-free losses and live/cached")
def test_none_needs_a_reference_free_loss():
    with pytest.raises(ConfigError, match=r"train.reference=none needs a reference-free loss \(sft, mapo, simpo\)"):
        load_config(None, ["train.method=dpo", "train.reference=none"])
    assert reference_strategy(load_config(None, ["train.method=simpo", "train.reference=none"]).train) == "none"


@pytest.mark.fault(input="`train.reference=live` or `cached` with a reference-free loss (sft, mapo, simpo)",
                   behaviour="config error: the loss uses no reference")
@pytest.mark.parametrize("strategy", ["live", "cached"])
def test_live_or_cached_need_a_loss_that_uses_a_reference(strategy):
    with pytest.raises(ConfigError, match=f"train.reference={strategy} but train.method 'mapo' uses no reference"):
        load_config(None, ["train.method=mapo", f"train.reference={strategy}"])


@pytest.mark.fault(input="`train.reference_epochs` < 1, or `model.reference_on_cpu` with a cached reference",
                   behaviour="config error naming the key")
def test_reference_epochs_and_reference_on_cpu_are_checked():
    with pytest.raises(ConfigError, match="train.reference_epochs must be >= 1, got 0"):
        load_config(None, ["train.reference=cached", "train.reference_epochs=0"])
    with pytest.raises(ConfigError, match="model.reference_on_cpu needs train.reference=live"):
        load_config(None, ["train.finetune=full", "model.reference_on_cpu=true", "train.reference=cached"])
