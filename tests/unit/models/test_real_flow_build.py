"""build_real_flow_pipeline (what `bench --arch sd35m|sd35l|flux` times): the real transformer of the published
config, in the real pipeline class, with small stand-in encoders and VAE of the real output shapes. Built on the
meta device: no memory, no compute."""

from __future__ import annotations

import pytest
import torch

from diffusion_dpo.models.arch_configs import vae_config
from diffusion_dpo.models.build import FLOW_ARCHS, build_real_flow_pipeline


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", sorted(FLOW_ARCHS))
def test_the_transformer_is_the_published_one_and_the_stand_ins_give_its_input_shapes(arch):
    from diffusion_dpo.plan.model import build_network, describe_arch

    with torch.device("meta"):
        pipe = build_real_flow_pipeline(arch, resolution=1024)
        published = build_network(describe_arch(arch))  # its sizes: tests/unit/plan/test_planner.py
    net = pipe.transformer
    assert type(net) is type(published) and _count(net) == _count(published)
    if arch == "flux":
        assert _count(net) == pytest.approx(11.9e9, rel=0.006)  # Flux.1-dev, the published "12B"
    cfg = net.config
    # the text the transformer reads: T5 states of joint_attention_dim, pooled CLIP outputs of pooled_projection_dim
    t5 = pipe.text_encoder_3 if arch != "flux" else pipe.text_encoder_2
    assert t5.config.d_model == cfg.joint_attention_dim == 4096
    clips = [pipe.text_encoder, pipe.text_encoder_2] if arch != "flux" else [pipe.text_encoder]
    pooled = sum(c.config.projection_dim if arch != "flux" else c.config.hidden_size for c in clips)
    assert pooled == cfg.pooled_projection_dim
    # stand-ins: one layer each, a few percent of the real encoders (T5-XXL alone is 4.76B)
    assert all(e.config.num_hidden_layers == 1 for e in clips) and t5.config.num_layers == 1
    assert sum(_count(e) for e in [*clips, t5]) < 40e6
    # the VAE: 16 latent channels, 8x downsampling (1024 px -> 128 latents), the real scale and shift
    real = vae_config(arch)
    assert pipe.vae.config.latent_channels == 16 and len(pipe.vae.config.block_out_channels) == 4
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (real["scaling_factor"], real["shift_factor"])
    assert _count(pipe.vae) < 1e6


def test_shrink_keeps_the_shapes_and_cuts_the_layers():
    with torch.device("meta"):
        sd3 = build_real_flow_pipeline("sd35m", resolution=64, shrink=True).transformer
        flux = build_real_flow_pipeline("flux", resolution=64, shrink=True).transformer
    assert len(sd3.transformer_blocks) == 1 and sd3.inner_dim == 128 and sd3.config.joint_attention_dim == 4096
    assert len(flux.transformer_blocks) == 1 and len(flux.single_transformer_blocks) == 1 and flux.inner_dim == 256
