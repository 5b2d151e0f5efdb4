"""models.lora.load_lora_into_pipeline: loads like pipe.load_lora_weights, without the text-encoder warning
for a UNet-only LoRA (what `train` writes)."""

from __future__ import annotations

import logging

import torch


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
