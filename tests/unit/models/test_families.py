"""Model families (models/families/): detection from a pipeline folder's configs, conditioning shapes,
DDPM targets derived by hand, what each family hands the network."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.models.encode import guidance_embedding
from diffusion_dpo.models.families import (FAMILIES, LCMFamily, SDFamily, SDXLFamily, detect_spec, family_of,
                                           family_of_pipeline)


@pytest.mark.parametrize("fixture, name, prediction", [("tiny_sd", "sd", "epsilon"), ("tiny_sd_v", "sd", "v_prediction"),
                                                       ("tiny_sdxl", "sdxl", "epsilon"), ("tiny_lcm", "lcm", "epsilon")])
def test_each_family_detects_itself_from_its_pipeline_folder(fixture, name, prediction, request):
    folder = request.getfixturevalue(fixture)
    spec = detect_spec(str(folder))
    assert (spec.family, spec.prediction_type) == (name, prediction)
    family = family_of(spec)
    assert family.name == name and family.spec is spec
    # the table is ordered: exactly the families before the detected one decline it
    index = [f.name for f in FAMILIES].index(name)
    from diffusion_dpo.models.loading import PipelineConfigs

    configs = PipelineConfigs(str(folder))
    assert [f.matches(configs) for f in FAMILIES[:index + 1]] == [False] * index + [True]


def test_forced_family_and_unknown_pipeline(tmp_path, tiny_sd):
    assert detect_spec(str(tiny_sd), family="lcm").family == "lcm"  # model.family forces it
    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="KandinskyPipeline; supported families"):
        detect_spec(str(other))
    assert detect_spec(str(other), family="sd").family == "sd"


def test_families_name_real_pipeline_classes_and_the_default_lora_targets():
    import diffusers

    for family in FAMILIES:
        assert hasattr(diffusers, family.pipeline_class)
        if family.network_folder == "unet":  # the transformers' (SD3, Flux) sets: test_flow_families
            # the list lora.target_modules defaulted to before families resolved it: older runs resume unchanged
            assert list(family.lora_targets) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert [f.size_conditioned for f in (SDFamily, SDXLFamily, LCMFamily)] == [False, True, False]


def test_family_of_a_loaded_pipeline(tiny_sdxl, tiny_lcm):
    from diffusers import DiffusionPipeline

    assert family_of_pipeline(DiffusionPipeline.from_pretrained(tiny_sdxl)) is SDXLFamily
    assert family_of_pipeline(DiffusionPipeline.from_pretrained(tiny_lcm)) is LCMFamily


def test_prompt_encodings_per_family(tiny_sd, tiny_sdxl):
    sd = family_of(detect_spec(str(tiny_sd))).prompt_encoder()
    cond = sd(["a red circle", "a dog"])
    hidden = sd.encoders[0][1].config.hidden_size
    assert cond.prompt_embeds.shape == (2, 77, hidden) and cond.pooled_prompt_embeds is None
    xl = family_of(detect_spec(str(tiny_sdxl))).prompt_encoder()
    cond = xl(["a red circle", "a dog"])
    (_, enc1), (_, enc2) = xl.encoders
    # both encoders' penultimate states side by side; pooled = the second encoder's projection
    assert cond.prompt_embeds.shape == (2, 77, enc1.config.hidden_size + enc2.config.hidden_size)
    assert cond.pooled_prompt_embeds.shape == (2, enc2.config.projection_dim)


def test_sdxl_pair_conditioning_is_one_time_id_row_per_pair(tiny_sdxl, tiny_sd):
    batch = {"original_size": torch.tensor([[[40, 50], [40, 50]], [[60, 32], [60, 32]]]),
             "crop_top_left": torch.tensor([[[1, 2], [1, 2]], [[0, 3], [0, 3]]]), "indices": torch.tensor([4, 9])}
    time_ids = family_of(detect_spec(str(tiny_sdxl))).pair_conditioning(batch, 32, "pair")
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w): winners, then the same rows for the losers
    rows = torch.tensor([[40, 50, 1, 2, 32, 32], [60, 32, 0, 3, 32, 32]], dtype=torch.float32)
    assert time_ids.dtype == torch.float32 and torch.equal(time_ids, torch.cat([rows, rows]))
    assert family_of(detect_spec(str(tiny_sd))).pair_conditioning(batch, 32, "pair") is None


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_noisy_input_and_target_by_hand(prediction):
    from diffusers import DDPMScheduler

    # alphas_cumprod = (0.64, 0.36): t=0 has (sqrt a, sqrt(1-a)) = (0.8, 0.6), t=1 (0.6, 0.8)
    sched = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 1 - 0.36 / 0.64], prediction_type=prediction)
    x0 = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]).view(2, 1, 1, 2)
    noise = torch.tensor([[3.0, -1.0], [2.0, 1.0]]).view(2, 1, 1, 2)
    noisy, target = SDFamily(spec=None).noisy_and_target(sched, x0, noise, torch.tensor([0, 1]))
    # x_t = sqrt(a) x0 + sqrt(1-a) eps: row 0 0.8*(1,2) + 0.6*(3,-1) = (2.6, 1.0);
    # row 1 0.6*(-1,0.5) + 0.8*(2,1) = (1.0, 1.1)
    assert torch.allclose(noisy.flatten(1), torch.tensor([[2.6, 1.0], [1.0, 1.1]]), atol=1e-6)
    # eps: the noise; v = sqrt(a) eps - sqrt(1-a) x0: row 0 (2.4-0.6, -0.8-1.2) = (1.8, -2.0); row 1 (1.2+0.8, 0.6-0.4)
    expected = noise.flatten(1) if prediction == "epsilon" else torch.tensor([[1.8, -2.0], [2.0, 0.2]])
    assert torch.allclose(target.flatten(1), expected, atol=1e-6)


class _Recorder(torch.nn.Module):
    """Stands in for the network: records what the family passes and returns zeros of the input's shape."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.calls: list[dict] = []

    def forward(self, noisy, t, **kwargs):
        self.calls.append({"noisy": noisy, "t": t, **kwargs})
        return (torch.zeros_like(noisy),)


def test_what_each_family_hands_the_network(tiny_sd, tiny_sdxl, tiny_lcm):
    from diffusion_dpo.models.encode import TextConditioning

    noisy, t = torch.randn(2, 4, 4, 4), torch.tensor([3, 7])
    cond = TextConditioning(torch.randn(2, 5, 8), torch.randn(2, 6))
    time_ids = torch.tensor([[683.0, 512, 0, 0, 32, 32]] * 2)
    net = _Recorder(torch.bfloat16)
    family_of(detect_spec(str(tiny_sd))).predict(net, noisy, t, cond, None)
    call = net.calls[-1]
    assert call["added_cond_kwargs"] is None and call["timestep_cond"] is None
    assert call["noisy"].dtype == torch.bfloat16 and call["encoder_hidden_states"].dtype == torch.bfloat16
    family_of(detect_spec(str(tiny_sdxl))).predict(net, noisy, t, cond, time_ids)
    added = net.calls[-1]["added_cond_kwargs"]
    # time ids stay float32 (683 would round to 684 in bf16); the pooled text takes the network's dtype
    assert added["time_ids"].dtype == torch.float32 and torch.equal(added["time_ids"], time_ids)
    assert added["text_embeds"].dtype == torch.bfloat16
    lcm_spec = detect_spec(str(tiny_lcm))
    family_of(lcm_spec, guidance_scale=6.0).predict(net, noisy, t, cond, None)
    expected = guidance_embedding(torch.full((2,), 6.0), lcm_spec.time_cond_proj_dim).to(torch.bfloat16)
    assert torch.equal(net.calls[-1]["timestep_cond"], expected)
