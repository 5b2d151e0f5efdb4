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


# ----------------------------------------------------------------------------------------------
# The launcher replays against the official launchers (SalesforceAIResearch/DiffusionDPO), in our keys:
# launchers/sd15.sh and launchers/sdxl.sh, with train.py's argparse defaults for flags they do not pass.
# Transcribed once from those files; docs/recipes.md cites the same sources.
_COMMON = {
    "train.method": "dpo", "train.finetune": "full", "train.error_reduction": "mean",  # (pred - target)^2 .mean([1,2,3])
    "train.learning_rate": 1e-8, "train.scale_lr": True,  # --learning_rate=1e-8 --scale_lr
    "train.max_steps": 2000, "train.lr_scheduler": "constant_with_warmup",
    "train.weight_decay": 0.01, "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.adam_epsilon": 1e-8,
    "train.max_grad_norm": 1.0,  # applied unless --use_adafactor, which neither launcher passes
    "train.mixed_precision": "fp16",  # train.py default
    "model.frozen_dtype": "float16", "model.reference_dtype": "float16",  # weight_dtype under fp16
    "train.timestep_range": (0, 1000),
    "data.crop": "center",  # CenterCrop unless --random_crop
    "data.random_flip": True, "data.shared_transforms": False,  # RandomHorizontalFlip per image
    "data.caption_dropout": 0.2,  # --proportion_empty_prompts default
    "data.drop_ties": True,  # 'pickapic' in the dataset name: label_0 in (0, 1) only
}
OFFICIAL = {
    "sd15_dpo.yaml": {**_COMMON, "train.beta": 5000.0, "train.optimizer": "adamw", "train.warmup_steps": 500,
                      "train.checkpoint_every": 500, "data.resolution": 512},
    "sdxl_dpo.yaml": {**_COMMON, "train.beta": 5000.0, "train.optimizer": "adafactor",  # --sdxl selects Adafactor
                      "train.warmup_steps": 200, "train.checkpoint_every": 200, "data.resolution": 1024,
                      "model.vae": "madebyollin/sdxl-vae-fp16-fix", "train.gradient_checkpointing": True},
}


def _value(cfg, key: str):
    """The effective value of `key`: warm-up in steps whichever way it is written, the reference's dtype."""
    if key == "train.warmup_steps":
        return cfg.warmup
    if key == "model.reference_dtype":
        return cfg.model.reference_dtype or cfg.model.frozen_dtype
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    return tuple(value) if isinstance(value, list) else value


def _deviation_table() -> dict[tuple[str, str], tuple[object, object]]:
    """{(config, key): (ours, official)} from the table in docs/recipes.md."""
    import yaml

    text = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
    section = text.split("### Where the shipped recipes differ from the official launchers", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].endswith(".yaml"):
            rows[(cells[0], cells[1])] = (yaml.safe_load(cells[2]), yaml.safe_load(cells[3]))
    return rows


def _yaml_comment(path: Path, key: str) -> str:
    """The comment on the line that sets `key` (section.name; warm-up matches warmup_steps or warmup_ratio)."""
    section, name = key.split(".")
    names = ("warmup_steps", "warmup_ratio") if key == "train.warmup_steps" else (name,)
    current = None
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            current = line.split(":")[0]
        elif current == section and line.strip().split(":")[0] in names:
            return line.partition("#")[2]
    return ""


def test_deviations_from_the_official_launchers_are_all_documented():
    table = _deviation_table()
    assert table, "docs/recipes.md lost its table of deviations from the official launchers"
    for (name, key) in table:
        assert name in OFFICIAL and key in OFFICIAL[name], f"docs/recipes.md lists {name} {key}, not a launcher value"
    for name, official in OFFICIAL.items():
        path = Path(__file__).parents[2] / "configs" / name
        cfg = load_config(path)
        for key, launcher_value in official.items():
            ours = _value(cfg, key)
            if ours == launcher_value:
                assert (name, key) not in table, f"docs/recipes.md says {name} {key} differs, but it equals the launcher"
                assert "DIFFERS" not in _yaml_comment(path, key), f"{name} {key}: marked DIFFERS but equals the launcher"
                continue
            assert (name, key) in table, f"{name} {key} = {ours!r}, official {launcher_value!r}: not in docs/recipes.md"
            assert table[(name, key)] == (ours, launcher_value), f"docs/recipes.md row for {name} {key} is stale"
            assert "DIFFERS" in _yaml_comment(path, key), f"{name} {key}: the YAML line needs a DIFFERS comment"
