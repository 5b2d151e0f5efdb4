"""models.lora.load_lora_into_pipeline: loads like pipe.load_lora_weights, without the text-encoder warning
for a UNet-only LoRA (what `train` writes)."""

from __future__ import annotations

import logging

import pytest
import torch

from diffusion_dpo.models.lora import load_lora_into_pipeline


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_unet_only_lora_loads_without_the_text_encoder_warning(tiny_sd, tmp_path):
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from diffusion_dpo.models import lora as lora_mod
    from diffusion_dpo.models.lora import load_lora_into_pipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))

    records = _Records()
    root = logging.getLogger("diffusers")
    root.addHandler(records)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()  # the suite runs diffusers at ERROR
    try:
        plain = StableDiffusionPipeline.from_pretrained(tiny_sd)
        plain.load_lora_weights(str(tmp_path / "lora"))
        assert any("No LoRA keys associated to CLIPTextModel" in m for m in records.messages)  # what we drop
        records.messages.clear()
        ours = StableDiffusionPipeline.from_pretrained(tiny_sd)
        load_lora_into_pipeline(ours, tmp_path / "lora")
        assert not any("No LoRA keys" in m for m in records.messages), records.messages
    finally:
        diffusers.utils.logging.set_verbosity(level)
        root.removeHandler(records)
    a = dict(plain.unet.named_parameters())
    b = dict(ours.unet.named_parameters())
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not any(isinstance(f, lora_mod._DropNoTextEncoderKeys)
               for f in logging.getLogger("diffusers.loaders.lora_base").filters)  # filter removed again


ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("first_block", ["CrossAttnDownBlock2D", "DownBlock2D"])
@pytest.mark.parametrize("targets", [ATTN, ATTN + ["conv1", "conv2"], ["conv1", "conv2", "proj_in", "proj_out"]])
def test_saved_lora_loads_into_stock_diffusers_completely(tiny_sd, tmp_path, targets, first_block):
    """Every adapter weight `save_lora` writes comes back through pipe.load_lora_weights, for attention-only,
    attention + convolution and convolution-only targets, whichever block comes first. (Files that wrote
    attention keys in diffusers' lora.down/up names and convolution keys in peft's lora_A/B names lost the
    attention half, silently, whenever a convolution key sorted first: the demo's UNet, which starts with a
    DownBlock2D.)"""
    from diffusion_dpo.models.families import SDFamily
    from diffusion_dpo.models.lora import save_lora

    unet, base, trained = _lora_unet(first_block, targets)
    save_lora(unet, tmp_path / "out", SDFamily)
    _check_loaded(tiny_sd, tmp_path / "out", unet, base, trained)


def test_files_of_the_old_mixed_naming_load_completely(tiny_sd, tmp_path):
    """Files written before the fix (attention keys renamed by convert_state_dict_to_diffusers, convolution keys
    not) load completely through load_lora_into_pipeline."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet, base, trained = _lora_unet("DownBlock2D", ATTN + ["conv1", "conv2"])
    old = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any(".lora.down." in k for k in old) and any(".lora_A." in k for k in old)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "old", unet_lora_layers=old, safe_serialization=True)
    _check_loaded(tiny_sd, tmp_path / "old", unet, base, trained)


def test_saved_lora_keeps_its_alpha_in_stock_diffusers(tiny_sd, tmp_path):
    """lora.alpha 8 at rank 4 (scale 2): the file carries the adapter config, so pipe.load_lora_weights scales by
    8/4 and computes what the trained UNet does (without it diffusers took alpha = rank, scale 1). A LoRA grown by
    train.curriculum.rank_schedule ends at the final alpha the same way."""
    from diffusion_dpo.models.families import SDFamily
    from diffusion_dpo.models.lora import save_lora

    unet, base, trained = _lora_unet("CrossAttnDownBlock2D", ATTN + ["conv1"], alpha=8.0)
    save_lora(unet, tmp_path / "out", SDFamily)
    _check_loaded(tiny_sd, tmp_path / "out", unet, base, trained)


def _lora_unet(first_block: str, targets: list[str], alpha=None):
    import copy

    from diffusers import UNet2DConditionModel

    from diffusion_dpo.models.lora import add_lora

    torch.manual_seed(0)
    cross = "CrossAttnDownBlock2D" if first_block == "DownBlock2D" else "DownBlock2D"
    up = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=32, down_block_types=(first_block, cross),
                                up_block_types=(up[cross], up[first_block]))
    base = copy.deepcopy(unet)
    add_lora(unet, 4, alpha, 0.0, targets, "gaussian")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # non-zero, so "not loaded" (zeros) cannot pass for "loaded"
    trained = {n.replace(".default", ""): p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    return unet, base, trained


def _check_loaded(tiny_sd, folder, unet, base, trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.unet = base
    load_lora_into_pipeline(pipe, folder)
    loaded = {n.replace(".default_0", ""): p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys() and len(trained) > 0
    for name in trained:
        assert torch.equal(loaded[name], trained[name]), name
    # and the pipeline's UNet computes what the trained one does
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ctx).sample, unet(x, t, ctx).sample, rtol=1e-5, atol=1e-6)


def test_implicit_reward_policy_loads_every_adapter_of_an_old_mixed_file(tiny_sd, tmp_path):
    """evaluate's implicit-reward accuracy loads LoRAs as `sample` does (the pipeline's load_lora_weights): same guarantee."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from diffusion_dpo.evaluate.implicit import _load_policy
    from diffusion_dpo.models.families import detect_spec, family_of

    unet, base, trained = _lora_unet("DownBlock2D", ATTN + ["conv1", "conv2"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.unet = base
    pipe.save_pretrained(tmp_path / "base")
    old = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "old", unet_lora_layers=old, safe_serialization=True)
    family = family_of(detect_spec(str(tmp_path / "base")))
    policy, _, _ = _load_policy(str(tmp_path / "base"), family, str(tmp_path / "old"), None, "float32")
    loaded = {n.replace(".default_0", ""): p.detach() for n, p in policy.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys()
    for name in trained:
        assert torch.equal(loaded[name], trained[name]), name


def test_sdxl_lora_with_convolution_targets_loads_completely(tiny_sdxl, tmp_path):
    """SDXL's UNet starts with a DownBlock2D, the layout that lost attention adapters: the same round trip
    through StableDiffusionXLPipeline, with the SDXL UNet's own conditioning."""
    import copy

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffusion_dpo.models.families import SDXLFamily
    from diffusion_dpo.models.lora import add_lora, save_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    config = dict(pipe.unet.config)
    down = list(config["down_block_types"])
    assert "DownBlock2D" in down and "CrossAttnDownBlock2D" in down
    config.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    base = copy.deepcopy(unet)
    add_lora(unet, 4, None, 0.0, ATTN + ["conv1", "conv2"], "gaussian")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trained = {n.replace(".default", ""): p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    save_lora(unet, tmp_path / "out", SDXLFamily)
    pipe.unet = base
    load_lora_into_pipeline(pipe, tmp_path / "out")
    loaded = {n.replace(".default_0", ""): p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys() and any("attn1" in k for k in trained)
    for name in trained:
        assert torch.equal(loaded[name], trained[name]), name
