"""models.reference.reference_mode: the LoRA UNet computes its starting weights, and its adapters stay trainable."""

from __future__ import annotations

import torch

from diffusion_dpo.models.build import build_unet
from diffusion_dpo.models.lora import add_lora
from diffusion_dpo.models.reference import reference_mode


def test_reference_mode_computes_the_base_and_keeps_adapters_trainable():
    torch.manual_seed(0)
    unet = build_unet("sd", "tiny", sample_size=8)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    text = torch.randn(1, 3, unet.config.cross_attention_dim)
    with torch.no_grad():
        base = unet(x, t, text).sample
    add_lora(unet, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    adapters = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in adapters:
            p.add_(0.1)  # adapters that change the output
        tuned = unet(x, t, text).sample
        with reference_mode(unet):
            # FSDP2 reads requires_grad at the first forward (this one, in training) to pick its gradient dtypes
            assert all(p.requires_grad for p in adapters)
            ref = unet(x, t, text).sample
    assert not torch.allclose(tuned, base)
    torch.testing.assert_close(ref, base, rtol=0, atol=0)
    assert all(p.requires_grad for p in adapters) and len(adapters) > 0
