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


# ----------------------------------------------------------------------------------------------
# The DrawBench recipes (Curriculum-DPO's rows): values from ../shared/REFERENCE.md section 5 ("R5" in the
# YAML comment of each line that sets one).
DRAWBENCH_TASKS = ("aesthetics", "hps", "text_alignment")
_DRAWBENCH_COMMON = {"train.finetune": "lora", "train.optimizer": "adamw", "train.weight_decay": 1e-4,
                     "train.max_grad_norm": 1.0, "train.lr_scheduler": "constant", "train.mixed_precision": "fp16",
                     "train.learning_rate": 1e-5, "train.batch_size": 16}
DRAWBENCH = {
    "sd15": {**_DRAWBENCH_COMMON, "train.method": "dpo", "train.beta": 2000.0, "lora.rank": 8, "lora.alpha": 8.0,
             "lora.init_weights": "gaussian", "lora.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
             "data.caption_dropout": 0.25, "data.resolution": 512},
    "lcm": {**_DRAWBENCH_COMMON, "train.method": "consistency_dpo", "train.beta": 400.0, "lora.rank": 64,
            "model.teacher": "Lykon/dreamshaper-7", "model.pretrained": "SimianLuo/LCM_Dreamshaper_v7",
            "loss.huber_c": 0.001, "loss.guidance_range": (5.0, 15.0), "loss.solver_steps": 50, "data.resolution": 768},
}


@pytest.mark.parametrize("family", sorted(DRAWBENCH))
@pytest.mark.parametrize("task", DRAWBENCH_TASKS)
def test_drawbench_recipes_carry_the_curriculum_dpo_settings(family, task):
    from diffusion_dpo.config import LCM_LORA_TARGETS

    path = Path(__file__).parents[2] / "configs" / f"drawbench_{family}_dpo_{task}.yaml"
    cfg = load_config(path)
    for key, expected in DRAWBENCH[family].items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert (tuple(value) if isinstance(expected, tuple) else value) == expected, key
        assert "R5" in _yaml_comment(path, key), f"{path.name} {key}: no source comment"
    if family == "lcm":
        assert tuple(cfg.lora.target_modules) == LCM_LORA_TARGETS and "R5" in _yaml_comment(path, "lora.target_modules")
    assert f"drawbench_{family}_{task}/pairs.jsonl" in cfg.data.source
    # the DPO baseline as shipped; Curriculum-DPO is the documented override, the paper's B = 5, K = 400
    assert not cfg.train.curriculum.enabled
    cur = load_config(path, ["train.curriculum.enabled=true"]).train.curriculum
    assert cur.enabled and (cur.levels, cur.steps_per_level, cur.difficulty) == (5, 400, "rank_difference")
    assert cfg.train.max_steps == cur.levels * cur.steps_per_level  # the last level gets its K steps


@pytest.mark.parametrize("name, family, beta", [("sd35_flow_dpo_lora.yaml", "SD3Family", 100.0),
                                                ("sd35_flow_dpo.yaml", "SD3Family", 100.0),
                                                ("flux_flow_dpo_lora.yaml", "FluxFamily", 2000.0)])
def test_flow_configs(name, family, beta):
    """The flow-matching recipes (docs/flow.md): the sourced betas, both MMDiT streams adapted, text cached."""
    from diffusion_dpo.models import families

    cfg = load_config(Path(__file__).parents[2] / "configs" / name)
    assert cfg.train.beta == beta and cfg.train.error_reduction == "mean" and cfg.data.cache_dir
    assert cfg.train.gradient_checkpointing and cfg.model.frozen_dtype == "bfloat16"
    if cfg.train.finetune == "lora":
        assert tuple(cfg.lora.target_modules) == getattr(families, family).lora_targets
