"""Fixed seeds, bit-identical reruns, resumption, atomic writes, settings checks."""

from __future__ import annotations

import json

import pytest

from diffusion_dpo.errors import ConfigError, UserError
from diffusion_dpo.evaluate.prompts import Prompt, PromptSet
from diffusion_dpo.evaluate.sampling import SampledModel, image_seed, resolve_settings, sample_model

PROMPTS = PromptSet("test", "inline", (Prompt("a red cat", "animals"), Prompt("a blue square", "shapes")))
FAST = dict(steps=2, resolution=32, progress=False)


def test_seed_rule_is_fixed_and_distinct():
    assert image_seed(0, 0, 0) == image_seed(0, 0, 0)
    seeds = {image_seed(s, p, i) for s in range(3) for p in range(20) for i in range(5)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)


def test_presets_resolve_per_family_and_flags_override():
    assert resolve_settings("paper", "sd").guidance == 7.5
    assert resolve_settings("paper", "sdxl").guidance == 5.0
    assert resolve_settings("paper", "lcm").guidance is None  # the pipeline's own default
    assert resolve_settings("drawbench-sd", "sdxl").guidance == 7.5
    s = resolve_settings("drawbench-lcm", "lcm")
    assert (s.scheduler, s.steps, s.resolution) == ("lcm", 8, 768)
    assert resolve_settings("drawbench-sd", "sd", steps=3).steps == 3
    with pytest.raises(ConfigError, match="--preset"):
        resolve_settings("nope", "sd")
    with pytest.raises(ConfigError, match="--scheduler"):
        resolve_settings(None, "sd", scheduler="magic")


def test_same_seed_same_images_bit_identical(tiny_sd, tmp_path):
    a = sample_model(SampledModel("base", str(tiny_sd)), PROMPTS, tmp_path / "a", images_per_prompt=2, **FAST)
    b = sample_model(SampledModel("base", str(tiny_sd)), PROMPTS, tmp_path / "b", images_per_prompt=2, **FAST)
    assert a.generated == 4 and a.files == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
    for f in a.files:
        assert (a.folder / f).read_bytes() == (b.folder / f).read_bytes()
    assert (a.folder / f).read_bytes() != (a.folder / a.files[0]).read_bytes()  # distinct seeds, distinct images
    rows = [json.loads(x) for x in (a.folder / "samples.jsonl").read_text().splitlines()]
    assert rows[1] == {"prompt_index": 0, "image_index": 1, "prompt": "a red cat", "category": "animals",
                       "seed": image_seed(0, 0, 1), "file": "00000_01.png"}
    record = json.loads((a.folder / "sampling.json").read_text())
    assert record["sampler"]["steps"] == 2 and record["family"] == "sd" and record["seed"] == 0
    assert not list(a.folder.glob(".*.tmp"))


def test_resume_skips_finished_images_and_regenerates_only_missing(tiny_sd, tmp_path):
    spec = SampledModel("base", str(tiny_sd))
    first = sample_model(spec, PROMPTS, tmp_path, images_per_prompt=2, **FAST)
    kept = (first.folder / "00000_00.png").stat().st_mtime_ns
    removed = (first.folder / "00001_01.png").read_bytes()
    (first.folder / "00001_01.png").unlink()
    again = sample_model(spec, PROMPTS, tmp_path, images_per_prompt=2, **FAST)
    assert (again.generated, again.skipped) == (1, 3)
    assert (first.folder / "00000_00.png").stat().st_mtime_ns == kept
    assert (first.folder / "00001_01.png").read_bytes() == removed
    done = sample_model(spec, PROMPTS, tmp_path, images_per_prompt=2, **FAST)
    assert (done.generated, done.skipped) == (0, 4)
    more = sample_model(spec, PROMPTS, tmp_path, images_per_prompt=3, **FAST)  # growing N is allowed
    assert (more.generated, more.skipped) == (2, 4)


def test_rerun_with_different_settings_is_refused(tiny_sd, tmp_path):
    spec = SampledModel("base", str(tiny_sd))
    sample_model(spec, PROMPTS, tmp_path, images_per_prompt=1, **FAST)
    (tmp_path / "base" / "00000_00.png").unlink()
    with pytest.raises(UserError, match="different sampler"):
        sample_model(spec, PROMPTS, tmp_path, images_per_prompt=1, steps=3, resolution=32, progress=False)


@pytest.mark.parametrize("family", ["tiny_sdxl", "tiny_lcm"])
def test_other_families_sample(family, request, tmp_path):
    path = request.getfixturevalue(family)
    r = sample_model(SampledModel("base", str(path)), PROMPTS.limit(1), tmp_path, preset="paper", **FAST)
    assert r.generated == 1


def test_tuned_unet_and_lora(tiny_sd, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "tuned_unet")
    base = sample_model(SampledModel("base", str(tiny_sd)), PROMPTS.limit(1), tmp_path / "s", **FAST)
    tuned = sample_model(SampledModel("tuned", str(tiny_sd), unet=str(tmp_path / "tuned_unet")), PROMPTS.limit(1),
                         tmp_path / "s", **FAST)
    assert (base.folder / "00000_00.png").read_bytes() != (tuned.folder / "00000_00.png").read_bytes()

    from diffusers import StableDiffusionPipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # peft initialises lora_B to zero: make the adapter change the output
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    lora = sample_model(SampledModel("lora", str(tiny_sd), lora=str(tmp_path / "lora")), PROMPTS.limit(1),
                        tmp_path / "s", **FAST)
    assert lora.generated == 1
    assert (base.folder / "00000_00.png").read_bytes() != (lora.folder / "00000_00.png").read_bytes()


def test_model_spec_checks():
    with pytest.raises(ConfigError, match="not both"):
        SampledModel("x", "base", lora="a", unet="b")
    with pytest.raises(ConfigError, match="plain folder name"):
        SampledModel("a/b", "base")


@pytest.mark.fault(input="`sample --out OUT --name NAME` where OUT/NAME is a non-empty folder not written by `sample`",
                   behaviour="exit 2: names the folder; its files are neither overwritten nor taken for samples")
def test_foreign_folder_is_refused(tiny_sd, tmp_path):
    mine = tmp_path / "base"
    mine.mkdir()
    (mine / "00000_00.png").write_bytes(b"my holiday picture")
    (mine / "samples.jsonl").write_text("my notes\n")
    with pytest.raises(UserError, match=r"base is not empty and was not written by `sample` \(no sampling.json\)"):
        sample_model(SampledModel("base", str(tiny_sd)), PROMPTS, tmp_path, **FAST)
    assert sorted(p.name for p in mine.iterdir()) == ["00000_00.png", "samples.jsonl"]
    assert (mine / "samples.jsonl").read_text() == "my notes\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        sample_model(SampledModel("file", str(tiny_sd)), PROMPTS, tmp_path, **FAST)
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert sample_model(SampledModel("empty", str(tiny_sd)), PROMPTS.limit(1), tmp_path, **FAST).generated == 1
