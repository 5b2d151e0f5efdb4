"""models/lean_autograd.py: the same forward and the same gradients, bit for bit, with fewer saved activations."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_dpo.models import lean_autograd
from diffusion_dpo.models.build import build_unet
from diffusion_dpo.models.lora import add_lora

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet(family: str, finetune: str, targets=ATTN):
    torch.manual_seed(0)
    unet = build_unet(family, "tiny", sample_size=8)
    if finetune == "lora":
        unet.requires_grad_(False)
        add_lora(unet, 4, None, 0.0, targets, "gaussian")  # non-zero B: every adapter gets a gradient path
    return unet


def _inputs(unet, family: str, n: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ctx = torch.randn(n, 7, unet.config.cross_attention_dim, generator=g)
    added = None
    if family == "sdxl":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(n, pooled, generator=g), "time_ids": torch.randn(n, 6, generator=g)}
    return x, t, ctx, added


def _step(unet, inputs, autocast: bool = False):
    x, t, ctx, added = inputs
    unet.zero_grad(set_to_none=True)
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet(x, t, ctx, added_cond_kwargs=added).sample
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads, sum(saved.values())


CASES = [
    ("sd", "lora", ATTN, False),
    ("sd", "lora", ATTN + ["conv1", "conv2"], False),  # the demo's targets: LoRA wraps convolutions too
    ("sd", "full", ATTN, False),
    ("sd", "lora", ATTN, True),  # bf16 autocast
    ("sd", "full", ATTN, True),
    ("sdxl", "lora", ATTN, False),
]


@pytest.mark.parametrize("family,finetune,targets,autocast", CASES)
def test_same_outputs_and_gradients_bit_for_bit_with_fewer_saved_tensors(family, finetune, targets, autocast):
    plain = _unet(family, finetune, targets)
    lean = copy.deepcopy(plain)
    counts = lean_autograd.apply(lean)
    assert counts["conv2d"] > 10 and counts["geglu"] >= 1 and counts["groupnorm"] > 5 and counts["silu"] >= 1
    assert counts["layernorm"] >= 3 and (counts["lora_down"] >= 4 if finetune == "lora" else counts["lora_down"] == 0)
    inputs = _inputs(plain, family)
    out_p, grads_p, saved_p = _step(plain, inputs, autocast)
    out_l, grads_l, saved_l = _step(lean, inputs, autocast)
    assert torch.equal(out_p, out_l)
    assert grads_p.keys() == grads_l.keys() and len(grads_p) > 0
    for name in grads_p:
        assert torch.equal(grads_p[name], grads_l[name]), name
    assert max(g.abs().max().item() for g in grads_p.values()) > 0
    # LoRA also drops every frozen convolution's input and the LayerNorm outputs its down-projections read;
    # full fine-tuning only the GEGLU gate and the GroupNorm outputs under a SiLU
    assert saved_l < (0.75 if finetune == "lora" else 0.95) * saved_p, (saved_l, saved_p)


def test_no_grad_and_removal_restore_the_plain_path():
    unet = _unet("sd", "lora")
    inputs = _inputs(unet, "sd")
    with torch.no_grad():
        before = unet(*inputs[:3]).sample
    _, _, saved_plain = _step(unet, inputs)
    assert lean_autograd.apply(unet)["conv2d"] > 0
    assert set(lean_autograd.apply(unet).values()) == {0}  # idempotent
    with torch.no_grad():
        assert torch.equal(unet(*inputs[:3]).sample, before)
    assert _step(unet, inputs)[2] < saved_plain
    lean_autograd.remove(unet)
    assert _step(unet, inputs)[2] == saved_plain
    assert not any(m._forward_hooks for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))


def test_gradient_checkpointing_and_silu_elsewhere_unchanged():
    """With gradient checkpointing the blocks recompute anyway; results must still match. A SiLU whose input
    is not a GroupNorm output (the time embedding's) takes the plain path."""
    plain = _unet("sd", "lora")
    plain.enable_gradient_checkpointing()
    lean = copy.deepcopy(plain)
    lean_autograd.apply(lean)
    inputs = _inputs(plain, "sd")
    out_p, grads_p, _ = _step(plain, inputs)
    out_l, grads_l, _ = _step(lean, inputs)
    assert torch.equal(out_p, out_l)
    for name in grads_p:
        assert torch.equal(grads_p[name], grads_l[name]), name
    silu = torch.nn.SiLU()
    lean_autograd.apply(silu)
    x = torch.randn(3, 5, requires_grad=True)
    y = silu(x)
    assert type(y.grad_fn).__name__ == "SiluBackward0"


def test_frozen_conv_gradient_matches_for_strides_groups_and_channels_last():
    torch.manual_seed(0)
    for kwargs, fmt in [({"stride": 2, "padding": 1}, torch.contiguous_format),
                        ({"padding": 1, "groups": 2}, torch.channels_last),
                        ({"padding": (0, 1), "dilation": 2}, torch.contiguous_format)]:
        conv = torch.nn.Conv2d(4, 6, 3, **kwargs).requires_grad_(False)
        lean = copy.deepcopy(conv)
        lean_autograd.apply(lean)
        x = torch.randn(2, 4, 9, 9).to(memory_format=fmt).requires_grad_(True)
        g = torch.randn_like(conv(x))
        (gx_plain,) = torch.autograd.grad(conv(x), x, g)
        y = lean(x)
        assert type(y.grad_fn).__name__ == "_FrozenConv2dBackward"
        (gx_lean,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx_plain, gx_lean), kwargs
    trainable = torch.nn.Conv2d(4, 4, 3)
    lean_autograd.apply(trainable)
    assert type(trainable(torch.randn(1, 4, 5, 5)).grad_fn).__name__ == "ConvolutionBackward0"


def test_each_part_alone_keeps_gradients_and_saves_memory():
    plain = _unet("sd", "lora", ATTN + ["conv1"])
    inputs = _inputs(plain, "sd")
    out_p, grads_p, saved_p = _step(plain, inputs)
    for part in lean_autograd.PARTS:
        lean = copy.deepcopy(plain)
        lean_autograd.apply(lean, (part,))
        out_l, grads_l, saved_l = _step(lean, inputs)
        assert torch.equal(out_p, out_l), part
        assert all(torch.equal(grads_p[k], grads_l[k]) for k in grads_p), part
        assert saved_l < saved_p, part
    with pytest.raises(ValueError, match="unknown lean_autograd parts"):
        lean_autograd.apply(plain, ("frozen_convs",))


def test_lora_down_projection_with_dropout_takes_the_plain_path():
    """lora_dropout > 0 puts a dropout between the LayerNorm and the down-projection: nothing to recompute."""
    torch.manual_seed(0)
    unet = build_unet("sd", "tiny", sample_size=8).requires_grad_(False)
    add_lora(unet, 4, None, 0.5, ATTN)
    lean_autograd.apply(unet)
    x, t, ctx, _ = _inputs(unet, "sd")
    names = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: names.append((n, type(o.grad_fn).__name__)))
             for n, m in unet.named_modules() if getattr(m, lean_autograd._PATCHED, None) == "lora_down"]
    unet(x, t, ctx)
    for h in hooks:
        h.remove()
    assert names and not any(kind == "_LayerNormLinearBackward" for _, kind in names)
