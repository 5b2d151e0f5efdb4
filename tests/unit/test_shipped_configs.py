"""Every shipped config loads; the paper recipes carry the paper's settings."""

from pathlib import Path

import pytest

from diffusion_dpo.config import load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"sd15_dpo.yaml", "sd15_dpo_lora.yaml", "sdxl_dpo.yaml", "sdxl_dpo_lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.pretrained and cfg.data.source
    assert cfg.train.batch_size * cfg.train.gradient_accumulation >= 1


@pytest.mark.parametrize("name, beta, optimizer", [("sd15_dpo.yaml", 2000.0, "adamw"),
                                                   ("sdxl_dpo.yaml", 5000.0, "adafactor")])
def test_paper_recipes(name, beta, optimizer):
    cfg = load_config(Path(__file__).parents[2] / "configs" / name)
    t = cfg.train
    assert t.beta == beta and t.optimizer == optimizer and t.finetune == "full"
    assert t.batch_size * t.gradient_accumulation == 2048  # pairs per optimizer step on one process
    assert t.learning_rate * (t.batch_size * t.gradient_accumulation if t.scale_lr else 1) == pytest.approx(2.048e-5)
    assert t.max_steps == 2000 and t.max_grad_norm == 1.0
    assert cfg.data.caption_dropout == 0.2
    if name == "sd15_dpo.yaml":
        assert cfg.warmup == 500


@pytest.mark.parametrize("name", ["sd15_dpo_lora.yaml", "sdxl_dpo_lora.yaml"])
def test_lora_variants_fit_one_gpu(name):
    cfg = load_config(Path(__file__).parents[2] / "configs" / name)
    assert cfg.train.finetune == "lora" and cfg.train.gradient_checkpointing
    assert cfg.train.mixed_precision == "bf16" and cfg.data.cache_dir
