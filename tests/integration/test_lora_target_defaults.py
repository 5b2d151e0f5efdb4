"""lora.target_modules unset = the detected family's set (RunConfig.with_network_defaults): SD3 and Flux adapt both
MMDiT streams, the UNet families keep the list older runs recorded (their folders resume), an explicit list is kept
as given, and the run's config.yaml, checkpoints and model card record the resolved list."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.models.families import FluxFamily, LCMFamily, SD3Family, SDFamily, SDXLFamily, detect_spec, \
    family_of
from diffusion_dpo.train.trainer import train

UNET_SET = ["to_q", "to_k", "to_v", "to_out.0"]  # lora.target_modules' default before families resolved it
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("targets"), n=4)


def _overrides(model, source, out, *extra: str) -> list[str]:
    return [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "train.max_steps=1",
            "train.batch_size=2", "train.checkpoint_every=1", "train.lr_scheduler=constant", "train.learning_rate=1e-3",
            "lora.rank=4", "output.report_to=none", f"output.dir={out}", *extra]


def _adapted(out) -> set[str]:
    """Module names (within the network) that the saved adapter file holds LoRA weights for."""
    keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    return {k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in keys}


def _linear_modules(model, targets) -> set[str]:
    """Every nn.Linear of the pipeline's network whose name ends with a target: what peft must adapt."""
    net = family_of(detect_spec(str(model))).load_network(torch.float32)
    return {name for name, mod in net.named_modules()
            if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}


@pytest.mark.parametrize("fixture, family", [("tiny_sd3", SD3Family), ("tiny_flux", FluxFamily)])
def test_flow_run_with_targets_unset_adapts_both_streams_and_records_the_list(fixture, family, request, tmp_path,
                                                                                data, caplog):
    model = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(model, data, out))
    assert cfg.lora.target_modules is None  # unset until the family is known
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        train(cfg)
    assert "without adapters" not in caplog.text  # the family's full set: no partial-coverage warning
    adapted = _adapted(out)
    assert adapted == _linear_modules(model, family.lora_targets)
    for target in TEXT_STREAM:  # the text (context) stream of the joint blocks has adapters too
        assert any(m.endswith("." + target) for m in adapted), target
    recorded = list(family.lora_targets)
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["target_modules"] == recorded
    ckpt_cfg = yaml.safe_load((out / "checkpoints" / "checkpoint-1" / "config.yaml").read_text())
    assert ckpt_cfg["lora"]["target_modules"] == recorded
    assert "| LoRA target modules | " + ", ".join(f"`{t}`" for t in recorded) + " |" in (out / "README.md").read_text()


def test_flow_run_keeps_an_explicit_partial_list_and_warns(tiny_sd3, tmp_path, data, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        train(load_config(None, _overrides(tiny_sd3, data, out, "lora.target_modules=[to_q,to_v]")))
    assert "['add_k_proj', 'add_q_proj', 'add_v_proj', 'to_add_out', 'to_k', 'to_out.0'] of the sd3" in caplog.text
    assert _adapted(out) == _linear_modules(tiny_sd3, ["to_q", "to_v"])
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["target_modules"] == ["to_q", "to_v"]


def test_sd_run_with_targets_unset_records_the_old_list_and_resumes_an_old_folder(tiny_sd, tmp_path, data):
    """A folder written with the explicit UNet list (as every run before this default recorded it) resumes with
    the key unset: the resolved config compares equal, no forced resume."""
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_sd, data, out, "lora.target_modules=[to_q,to_k,to_v,to_out.0]",
                                       "train.max_steps=2")))
    saved = yaml.safe_load((out / "checkpoints" / "checkpoint-2" / "config.yaml").read_text())
    assert saved["lora"]["target_modules"] == UNET_SET
    summary = train(load_config(None, _overrides(tiny_sd, data, out, "train.max_steps=3")))  # key unset
    assert summary["steps"] == 3 and summary["steps_this_run"] == 1 and "forced_resumes" not in summary
    assert json.loads((out / "train_run.json").read_text())["forced_resumes"] == []
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["target_modules"] == UNET_SET
    assert _adapted(out) == _linear_modules(tiny_sd, UNET_SET)


def test_resolution_per_family_and_method():
    unset = load_config(None, [])
    for family in (SDFamily, SDXLFamily, LCMFamily):  # the list older runs recorded: their resumes compare equal
        assert unset.with_network_defaults(family.lora_targets).lora.target_modules == UNET_SET
    for family in (SD3Family, FluxFamily):
        assert unset.with_network_defaults(family.lora_targets).lora.target_modules == [*UNET_SET, *TEXT_STREAM]
    assert unset.lora.target_modules is None  # a new config: the loaded one is left as it was
    explicit = load_config(None, ["lora.target_modules=[to_q]"])
    assert explicit.with_network_defaults(SD3Family.lora_targets).lora.target_modules == ["to_q"]


def test_the_docs_table_lists_every_familys_default_set():
    """docs/recipes.md, "LoRA targets": one row per family whose list is the family's lora_targets."""
    from pathlib import Path

    from diffusion_dpo.models.families import FAMILIES

    text = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
    section = text.split("### LoRA targets")[1].split("\n#")[0]
    rows = {cells[1].strip(" `"): cells[2].strip(" `") for line in section.splitlines()
            if len(cells := line.split("|")) > 3 and cells[1].strip().startswith("`")}
    assert set(rows) == {f.name for f in FAMILIES}
    for family in FAMILIES:
        assert tuple(rows[family.name].split(", ")) == family.lora_targets, family.name


def test_train_help_names_the_default(capsys):
    from diffusion_dpo.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "lora.target_modules default: the detected family's set" in out and "docs/recipes.md" in out
