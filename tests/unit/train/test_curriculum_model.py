"""train.curriculum.rank_schedule (Curriculum-DPO++'s model-level curriculum): growing the LoRA rank keeps the
network's output, the old factors and the old optimizer moments; the schedule's steps; the config checks."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.models.lora import add_lora, grow_lora
from diffusion_dpo.train.curriculum_model import RankSchedule, move_optimizer

# attention projections (Linear) and resnet convolutions (Conv2d 3x3): both kinds of peft layer
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _unet(tiny_sd, rank: int, alpha: float, init: str = "default"):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    torch.manual_seed(0)
    add_lora(unet, rank, alpha, 0.0, TARGETS, init)
    with torch.no_grad():  # B is zero at initialisation: give every adapter a non-zero product to keep
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return unet.eval()


def _inputs(unet):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    text = torch.randn(2, 3, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 700]), text


def _factors(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_growing_the_rank_keeps_the_output_and_the_old_factors(tiny_sd, init):
    from peft.tuners.lora import LoraLayer

    # alpha 3 at rank 2: scale 1.5, not 1, so a scale recomputed as alpha / new rank would show
    unet = _unet(tiny_sd, 2, 3.0, init)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].clone(), o.clone()))) for n, m in layers.items()]
    x = _inputs(unet)
    with torch.no_grad():
        before = unet(*x).sample
        for hook in hooks:
            hook.remove()
        lora_part = before - _without_adapters(unet, x)
    old = _factors(unet)
    replaced = grow_lora(unet, 5)
    with torch.no_grad():
        after = unet(*x).sample
        # B' A' = [B, 0] [A; A_new] = B A: each adapted layer computes the same function. Its output on the same
        # input: bit-identical for the convolutions; for the linear layers the float32 GEMM for 5 output rows of
        # A sums the input features in another grouping than for 2, a rounding difference of an ulp or two
        # (relative 2e-7 here), asserted below 1e-6 of the layer's output
        for name, layer in layers.items():
            inp, out = seen[name]
            tolerance = 0 if isinstance(layer.lora_A["default"], torch.nn.Conv2d) else 1e-6 * out.abs().max().item()
            assert (layer(inp) - out).abs().max().item() <= tolerance, name
    # through the whole UNet the rounding differences add up, still far below the adapters' own effect
    assert lora_part.abs().max() > 1e-2
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max().item())
    new = _factors(unet)
    assert len(replaced) == len(new) == len(old) == 2 * len(layers) > 0
    for name, a in old.items():
        b = new[name]
        if "lora_A" in name:  # (rank, in, *kernel): old rows first, new rows drawn as peft draws a fresh A
            assert b.shape == (5, *a.shape[1:]) and torch.equal(b[:2], a)
            std = b[2:].std().item()
            if init == "gaussian":
                assert 0.1 < std < 0.3  # peft's gaussian A: std 1 / rank = 0.2
            else:
                assert std > 0 and b[2:].abs().max() <= 1 / a[0].numel() ** 0.5  # kaiming-uniform(a=sqrt 5): 1/sqrt(fan_in)
        else:  # (out, rank, *1): old columns first, new columns zero
            assert b.shape == (a.shape[0], 5, *a.shape[2:]) and torch.equal(b[:, :2], a)
            assert not b[:, 2:].any()
    for layer in layers.values():
        assert layer.r["default"] == 5 and layer.scaling["default"] == 1.5 and layer.lora_alpha["default"] == 7.5
    assert unet.peft_config["default"].r == 5 and unet.peft_config["default"].lora_alpha == 7.5


def _without_adapters(unet, x):
    unet.disable_adapters()
    try:
        return unet(*x).sample
    finally:
        unet.enable_adapters()


# torch's AdamW kernels: the per-tensor loop, the multi-tensor one, and the fused one build_optimizer picks on CUDA
@pytest.mark.parametrize("kernel", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_optimizer_moves_onto_the_grown_tensor_and_the_old_block_steps_as_before(kernel):
    # A is (r, n) = (2, 3) grown to (4, 3); B is (m, r) = (3, 2) grown to (3, 4)
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.01, **kernel)
    grads = [(torch.randn(2, 3), torch.randn(3, 2)) for _ in range(3)]
    for ga, gb in grads[:2]:
        a.grad, b.grad = ga, gb
        opt.step()
    reference = torch.optim.AdamW([ra := torch.nn.Parameter(a.detach().clone()),
                                   rb := torch.nn.Parameter(b.detach().clone())], lr=0.1, weight_decay=0.01, **kernel)
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))  # the un-grown run, continued (own tensors)
    a2 = torch.nn.Parameter(torch.cat([a.detach(), torch.randn(2, 3)]))
    b2 = torch.nn.Parameter(torch.cat([b.detach(), torch.zeros(3, 2)], dim=1))
    move_optimizer(opt, [(a, a2), (b, b2)])
    assert opt.param_groups[0]["params"] == [a2, b2] and a not in opt.state
    sa, sb = opt.state[a2], opt.state[b2]
    assert float(sa["step"]) == 2.0  # torch's AdamW counts steps per tensor: the count goes on
    assert torch.equal(sa["exp_avg"][:2], reference.state[ra]["exp_avg"]) and not sa["exp_avg"][2:].any()
    assert torch.equal(sb["exp_avg_sq"][:, :2], reference.state[rb]["exp_avg_sq"]) and not sb["exp_avg_sq"][:, 2:].any()
    # one more step: the old block moves exactly as the un-grown tensors do
    ga, gb = grads[2]
    extra_a, extra_b = torch.randn(2, 3), torch.randn(3, 2)
    a2.grad, b2.grad = torch.cat([ga, extra_a]), torch.cat([gb, extra_b], dim=1)
    new_rows_before = a2.detach()[2:].clone()
    opt.step()
    ra.grad, rb.grad = ga, gb
    reference.step()
    assert torch.equal(a2.detach()[:2], ra.detach()) and torch.equal(b2.detach()[:, :2], rb.detach())
    # a new entry starts from zero moments with the tensor's step count t = 3: m = (1 - b1) g, v = (1 - b2) g^2,
    # update = lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), after decoupled decay x (1 - lr wd)
    b1, b2_, t, lr, eps = 0.9, 0.999, 3, 0.1, 1e-8
    g = extra_a
    m, v = (1 - b1) * g, (1 - b2_) * g * g
    expected = new_rows_before * (1 - lr * 0.01) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2_ ** t)).sqrt() + eps)
    assert torch.allclose(a2.detach()[2:], expected, rtol=1e-5, atol=1e-7)


def test_schedule_steps_follow_the_level_boundaries():
    s = RankSchedule((2, 4, 8), steps_per_level=3, alpha=16.0)
    # level k covers steps 3(k-1)+1 .. 3k; levels beyond the schedule keep its last rank
    assert [s.rank_at(step) for step in range(1, 12)] == [2, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8]
    assert s.rank_after(0) == 2 and s.rank_after(3) == 2 and s.rank_after(4) == 4
    assert s.switch_steps() == [4, 7]
    assert s.first_alpha == 4.0  # scale 16 / 8 = 2 from the start: alpha 2 x 2 at rank 2
    assert s.describe() == {"ranks": [2, 4, 8], "first_step_of_each_rank": [1, 4, 7]}
    cfg = load_config(None, ["lora.rank=8", "train.curriculum.rank_schedule=[2,4,8]", "train.curriculum.steps_per_level=3"])
    assert RankSchedule.of(cfg) == RankSchedule((2, 4, 8), 3, 8)
    assert RankSchedule.of(load_config(None, [])) is None


BAD = [
    (["lora.rank=8", "train.curriculum.rank_schedule=[4,2,8]"], "must be increasing ranks >= 1"),
    (["lora.rank=8", "train.curriculum.rank_schedule=[4,4,8]"], "must be increasing ranks >= 1"),
    (["lora.rank=8", "train.curriculum.rank_schedule=[0,8]"], "must be increasing ranks >= 1"),
    (["lora.rank=8", "train.curriculum.rank_schedule=[]"], "must be increasing ranks >= 1"),
    (["train.finetune=full", "lora.rank=8", "train.curriculum.rank_schedule=[2,8]"], "train.finetune=full"),
    (["lora.rank=16", "train.curriculum.rank_schedule=[2,8]"], "set lora.rank=8"),
    (["lora.rank=8", "train.curriculum.levels=2", "train.curriculum.rank_schedule=[2,4,8]"], "train.curriculum.levels=2"),
    (["lora.rank=8", "train.optimizer=adafactor", "train.curriculum.rank_schedule=[2,8]"], "train.optimizer=adamw"),
    # rank 8 would start at step 2 x 400 + 1 = 801: a run of 800 steps would save a rank-4 LoRA
    (["lora.rank=8", "train.max_steps=800", "train.curriculum.rank_schedule=[2,4,8]"], "reaches rank 8 at step 801"),
]


@pytest.mark.fault(input="`train.curriculum.rank_schedule` not increasing, or a rank < 1, or empty",
                   behaviour="exit 2: one line, ranks must increase")
@pytest.mark.fault(input="`train.curriculum.rank_schedule` with `train.finetune=full`",
                   behaviour="exit 2: one line, it grows a LoRA adapter")
@pytest.mark.fault(input="`train.curriculum.rank_schedule` not ending at `lora.rank`, or longer than `levels`",
                   behaviour="exit 2: one line naming the final rank / the levels")
@pytest.mark.fault(input="`train.curriculum.rank_schedule` with an optimizer other than adamw",
                   behaviour="exit 2: one line, needs `train.optimizer=adamw`")
@pytest.mark.fault(input="`train.curriculum.rank_schedule` whose last rank starts after `train.max_steps`",
                   behaviour="exit 2: one line naming the step the final rank would start")
@pytest.mark.parametrize("overrides,expected", BAD)
def test_bad_rank_schedules_are_one_line_errors(overrides, expected, capsys, tmp_path):
    with pytest.raises(ConfigError, match="train.curriculum.rank_schedule="):
        load_config(None, overrides)
    assert main(["train", f"output.dir={tmp_path / 'out'}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: train.curriculum.rank_schedule=") and expected in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
