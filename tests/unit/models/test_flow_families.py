"""Flow-matching families (SD3 / SD3.5, Flux.1: models/families/sd3.py, flux.py, flowbase.py): detection from a
pipeline folder, the tiny builders (T5 tokenizer built in-process), conditioning as the stock pipelines build it,
the velocity target and what the transformer receives."""

from __future__ import annotations

import json
import shutil

import pytest

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.models.families import FAMILIES, FluxFamily, SD3Family, detect_spec, family_of, family_of_pipeline
from diffusion_dpo.models.loading import PipelineConfigs

PROMPTS = ["a red circle", "photo of a small dog", ""]


@pytest.mark.parametrize("fixture, name, guidance", [("tiny_sd3", "sd3", False), ("tiny_flux", "flux", True)])
def test_flow_families_detect_themselves_from_their_pipeline_folder(fixture, name, guidance, request):
    folder = request.getfixturevalue(fixture)
    spec = detect_spec(str(folder))
    assert (spec.family, spec.prediction_type, spec.guidance_embeds) == (name, "flow", guidance)
    # the VAE's 16 channels, its shift and scale, 2x downsampling of the tiny VAE
    assert (spec.latent_channels, spec.vae_shift_factor, spec.vae_scaling_factor, spec.vae_downsample) == (16, 0.1, 1.0, 2)
    index = [f.name for f in FAMILIES].index(name)
    configs = PipelineConfigs(str(folder))
    assert [f.matches(configs) for f in FAMILIES[:index + 1]] == [False] * index + [True]
    schedule = family_of(spec).schedule  # the scheduler config as the real pipelines': SD3 shift 3, Flux dynamic
    assert (schedule.shift, schedule.use_dynamic_shifting) == ((3.0, False) if name == "sd3" else (3.0, True))


def test_family_of_a_loaded_flow_pipeline(tiny_sd3, tiny_flux):
    from diffusers import DiffusionPipeline

    assert family_of_pipeline(DiffusionPipeline.from_pretrained(tiny_sd3)) is SD3Family
    assert family_of_pipeline(DiffusionPipeline.from_pretrained(tiny_flux)) is FluxFamily


def test_t5_tokenizer_is_built_in_process_and_loads_back(tiny_sd3):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny_sd3 / "tokenizer_3")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red circle", padding="max_length", max_length=8).input_ids
    # one piece per known word, then </s>, then padding; unknown words still tokenise (by characters)
    assert tok.convert_ids_to_tokens(ids[:3]) == ["\u2581a", "\u2581red", "\u2581circle"] and ids[3:] == [1, 0, 0, 0, 0]
    assert tok.unk_token_id not in tok("zebra xylophone").input_ids


@pytest.mark.fault(input="`model.family=sd3` or `flux` forced on a UNet pipeline (or a UNet family on a transformer "
                         "pipeline)", behaviour="one-line ModelLoadError naming the folder, the missing part and the fix")
@pytest.mark.parametrize("forced, fixture", [("sd3", "tiny_sd"), ("flux", "tiny_sd"), ("sd", "tiny_sd3"),
                                             ("sdxl", "tiny_flux")])
def test_wrong_forced_family_is_one_line(forced, fixture, request):
    folder = request.getfixturevalue(fixture)
    with pytest.raises(ModelLoadError, match=f"model.family={forced} does not fit") as err:
        detect_spec(str(folder), family=forced)
    assert "\n" not in str(err.value) and "model.family=auto" in str(err.value)


@pytest.mark.fault(input="SD3 / Flux pipeline folder without its T5 text encoder (`text_encoder_3/` or `text_encoder_2/`)",
                   behaviour="one-line ModelLoadError naming the folder when the text encoders load")
@pytest.mark.parametrize("fixture, t5", [("tiny_sd3", "text_encoder_3"), ("tiny_flux", "text_encoder_2")])
def test_missing_t5_folder_is_one_line(fixture, t5, request, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(request.getfixturevalue(fixture), broken)
    shutil.rmtree(broken / t5)
    family = family_of(detect_spec(str(broken)))
    with pytest.raises(ModelLoadError, match=f"could not load {t5} from folder") as err:
        family.load_text_encoders()
    assert "\n" not in str(err.value)


def test_unknown_transformer_pipeline_is_refused(tmp_path, tiny_sd3):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd3, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"], index["transformer"] = "PixArtSigmaPipeline", ["diffusers", "PixArtTransformer2DModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError):
        detect_spec(str(other))
