"""The planner's parts: the live-bytes counter, the engine formulas, the published configs, the memory flag."""

from __future__ import annotations

import pytest
import torch

from diffusion_dpo.plan.engines import ENGINES, engine_bytes, fits, plan_engines, recommend
from diffusion_dpo.plan.simulate import StepProfile
from diffusion_dpo.plan.tracker import LiveBytes

MB = 2**20


def test_live_bytes_counts_each_storage_once_and_takes_freed_ones_off():
    tracker = LiveBytes()
    with tracker:
        x = torch.ones(256, 1024)  # 1 MiB of float32
        view = x[:128]  # a view: the same storage, nothing new
        y = x * 2  # 1 MiB more: peak 2 MiB
        del x, view  # x's storage freed
        z = y.to(torch.float16)  # 0.5 MiB
    assert tracker.peak == 2 * MB
    assert tracker.now["act"] == MB + MB // 2
    assert [sum(p) for p in tracker.timeline] == [MB, 2 * MB, MB + MB // 2]
    del y, z
    assert tracker.now["act"] == 0


def test_a_gradient_is_relabelled_and_static_weights_count_nothing_new():
    tracker = LiveBytes()
    w = torch.nn.Parameter(torch.zeros(1024, 256))  # 1 MiB
    tracker.record(w, "static")
    w.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "grad"))
    with tracker:
        (w * 3).sum().backward()
        with torch.no_grad():
            w.add_(w.grad)  # an in-place update of a weight: no new storage
    assert tracker.now["grad"] == MB and tracker.now["static"] == MB


def _profile(timeline, trainable=400, frozen=0, reference=0, encoders=0, unit=10):
    return StepProfile(weights={"policy_trainable": trainable, "policy_frozen": frozen, "reference": reference,
                                "encoders": encoders},
                       timeline=timeline, peak=0, flops=0.0, parameters={"network": 100, "trainable": 100,
                                                                         "reference": 0, "encoders": 0},
                       largest_unit=unit)


def test_engine_formulas_by_hand():
    # full fine-tuning: 400 B trained weights, a 400 B reference copy, 50 B of encoders; two moments of the step:
    # forward end (activations 1000, no grads) and optimizer step (activations 100, grads 400, optimizer 800)
    p = _profile([(1000, 0, 800), (100, 400, 800)], trainable=400, reference=400, encoders=50, unit=10)
    engine = {e.name: e for e in ENGINES}
    n = 4
    # ddp: everything whole + one more copy of the gradients (buckets)
    assert engine_bytes(engine["ddp"], p, n) == 400 + 400 + 50 + 400 + max(1000 + 800, 100 + 400 + 800)
    assert engine_bytes(engine["ddp"], p, 1) == 400 + 400 + 50 + max(1000 + 800, 100 + 400 + 800)  # no DDP at N=1
    # zero2: weights and reference whole, gradients and optimizer 1/4, buckets = min(grads, 4 GB) = 400
    assert engine_bytes(engine["zero2"], p, n) == 400 + 400 + 50 + 400 + max(1000 + 200, 100 + 100 + 200)
    # fsdp: weights and reference 1/4, gradients and optimizer 1/4, three blocks of 10
    assert engine_bytes(engine["fsdp"], p, n) == 100 + 100 + 50 + 30 + max(1000 + 200, 100 + 100 + 200)
    # zero3: as fsdp but the reference whole
    assert engine_bytes(engine["zero3"], p, n) == 100 + 400 + 50 + 30 + 1200
    # offload: gradients and optimizer on the CPU
    assert engine_bytes(engine["zero2+offload"], p, n) == 400 + 400 + 50 + 400 + 1000
    assert engine_bytes(engine["fsdp+offload"], p, n) == 0 + 0 + 50 + 30 + 1000
    assert engine_bytes(engine["zero3+offload"], p, n) == 0 + 400 + 50 + 30 + 1000


def test_fits_keeps_headroom_and_recommend_takes_the_first_that_fits():
    gib = 2**30
    assert fits(10 * gib, 12 * gib) is True  # 10 x 1.1 + 1 GiB of context = 12 GiB: just fits
    assert fits(10 * gib, 12 * gib - 2**20) is False
    p = _profile([(10 * gib, 0, 0)], trainable=33 * gib, unit=gib)
    rows = plan_engines(p, 8, 80 * gib)
    assert [r["engine"] for r in rows] == [e.name for e in ENGINES]
    assert not rows[0]["fits"]  # ddp: 33 + 33 (buckets) + 10 = 76 GiB, x 1.1 + 1 > 80
    assert recommend(rows)["engine"] == "zero2"  # 33 + min(33, 3.7) + 10 = 46.7 GiB
    assert recommend([{**r, "fits": False} for r in rows]) is None


@pytest.mark.parametrize("arch,network,encoders", [
    ("sd15", 859.52e6, [123.06e6]),
    ("sdxl", 2567.46e6, [123.06e6, 694.66e6]),
    ("sd35l", 8.1e9, [123.65e6, 694.66e6, 4762.3e6]),
    ("flux", 11.9e9, [123.06e6, 4762.3e6]),
])
def test_published_configs_give_the_published_sizes(arch, network, encoders):
    """The model cards' and the community's usual counts: SD 1.5's UNet 859.52M, SDXL's 2.567B, SD3.5 Large
    "8.1B", Flux.1-dev "12B" (11.9B), CLIP-L 123.06M (123.65M with SD3's projection), OpenCLIP bigG 694.66M, the
    T5-XXL encoder 4.76B, the VAE 83.65M (83.82M for the 16-channel one); the rounded ones to their rounding."""
    from diffusion_dpo.plan.model import build_encoders, build_network, describe_arch

    desc = describe_arch(arch)
    with torch.device("meta"):
        net = build_network(desc)
        vae, encs = build_encoders(desc, torch.float32)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(network, rel=0.006)
    assert [sum(p.numel() for p in e.parameters()) for e, _ in encs] == pytest.approx(encoders, rel=1e-4)
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(83.65e6 if arch in ("sd15", "sdxl") else 83.82e6,
                                                                     rel=1e-4)


@pytest.mark.fault(input="`plan --device-memory 80XB` (unknown unit) or a size <= 0",
                   behaviour="exit 2: names --device-memory and gives examples")
def test_device_memory_units():
    from diffusion_dpo.commands.plan import parse_memory
    from diffusion_dpo.errors import ConfigError

    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("24") == 24 * 2**30 and parse_memory("1.5 TiB") == int(1.5 * 2**40)
    for bad in ("80XB", "-4GB", "0GiB", "lots"):
        with pytest.raises(ConfigError, match="--device-memory"):
            parse_memory(bad)


_VAE = {"block_out_channels": [32, 64], "latent_channels": 4, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
_FLOW = {  # 1-2 layer transformers of the real classes, their text from a CLIP (77 tokens) and a T5 (16 tokens)
    "SD3Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16),
    "FluxTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
}


@pytest.mark.parametrize("network_class", sorted(_FLOW))
def test_a_lora_step_of_a_flow_transformer_costs_three_forwards(network_class):
    """The planner calls SD3 and Flux transformers with their training inputs (text tokens, pooled text, Flux's
    packed latents, ids and guidance). A LoRA DPO step = reference forward + policy forward + a backward that
    computes input gradients only (frozen weights: about one forward) = 3 forwards of the 2B rows, up to the
    adapters' own small matmuls and their weight gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion_dpo.config import load_config
    from diffusion_dpo.plan.model import ModelDesc, build_network, network_inputs
    from diffusion_dpo.plan.simulate import simulate
    from diffusion_dpo.plan.tracker import fake_module

    desc = ModelDesc("tiny", network_class, _FLOW[network_class], _VAE,
                     [("text_encoder", "CLIPTextModelWithProjection", {}, 77), ("text_encoder_2", "T5EncoderModel", {}, 16)])
    cfg = load_config(None, ["data.format=cache", "train.batch_size=2", "train.finetune=lora", "lora.rank=2"])
    profile = simulate(cfg, desc, 32)
    with torch.device("meta"):
        net = build_network(desc)
    fm = FakeTensorMode()
    fake_module(net, fm)
    with fm, FlopCounterMode(display=False) as forward:
        net(**network_inputs(desc, net, 4, torch.randn(4, 4, 16, 16)))
    assert profile.flops == pytest.approx(3 * forward.get_total_flops(), rel=0.05)
    assert profile.parameters["trainable"] > 0 and profile.weights["reference"] == 0
    assert profile.peak > sum(profile.weights.values())
