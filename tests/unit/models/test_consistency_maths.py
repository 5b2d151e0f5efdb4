"""models.consistency: the maths of Consistency-DPO checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_dpo.models.consistency import (boundary_scalings, consistency_output, guided_ddim_step, pseudo_huber,
                                              solver_timesteps, x0_and_eps)


def test_boundary_scalings_by_hand():
    t = torch.tensor([0.0, 0.05, 1.0, 999.0])
    c_skip, c_out = boundary_scalings(t)
    # t/0.1 = 0, 0.5, 10, 9990; sigma_data^2 = 0.25
    # t=0:    c_skip = 0.25 / 0.25 = 1,             c_out = 0 / 0.5 = 0      (identity at the boundary)
    # t=0.05: c_skip = 0.25 / (0.25 + 0.25) = 0.5,  c_out = 0.5 / sqrt(0.5) = sqrt(0.5)
    # t=1:    c_skip = 0.25 / 100.25,               c_out = 10 / sqrt(100.25)
    # t=999:  c_skip = 0.25 / (9990^2 + 0.25),      c_out = 9990 / sqrt(9990^2 + 0.25)
    expected_skip = [1.0, 0.5, 0.25 / 100.25, 0.25 / (9990.0 ** 2 + 0.25)]
    expected_out = [0.0, math.sqrt(0.5), 10 / math.sqrt(100.25), 9990 / math.sqrt(9990.0 ** 2 + 0.25)]
    assert c_skip.tolist() == pytest.approx(expected_skip, rel=1e-6)
    assert c_out.tolist() == pytest.approx(expected_out, rel=1e-6)


def test_solver_grid_fifty_steps_over_a_thousand():
    start, prev = solver_timesteps(torch.tensor([0, 1, 49]), 1000, 50)
    # skip k = 1000 // 50 = 20; s_n = (n + 1) * 20 - 1; t_n = max(s_n - 20, 0)
    assert start.tolist() == [19, 39, 999]
    assert prev.tolist() == [0, 19, 979]


def test_x0_and_eps_epsilon_and_v():
    x, a = torch.tensor([[[[1.0]]]]), torch.tensor([0.64])  # sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    x0, eps = x0_and_eps(torch.tensor([[[[0.5]]]]), x, a, "epsilon")
    assert x0.item() == pytest.approx((1 - 0.6 * 0.5) / 0.8) and eps.item() == 0.5  # (x - 0.6 eps) / 0.8 = 0.875
    x0, eps = x0_and_eps(torch.tensor([[[[0.5]]]]), x, a, "v_prediction")
    assert x0.item() == pytest.approx(0.8 * 1 - 0.6 * 0.5)  # 0.5
    assert eps.item() == pytest.approx(0.6 * 1 + 0.8 * 0.5)  # 1.0; and 0.8 * 0.5 + 0.6 * 1.0 = 1 = x
    assert 0.8 * x0.item() + 0.6 * eps.item() == pytest.approx(1.0)


def test_consistency_output_by_hand():
    x = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    eps = torch.tensor([0.5, -0.5]).view(1, 1, 1, 2)
    a = torch.tensor([0.64])
    # x0 = (x - 0.6 eps) / 0.8 = [0.875, 2.875]; at t = 0.05: c_skip 0.5, c_out sqrt(0.5)
    f = consistency_output(eps, x, torch.tensor([0.05]), a, "epsilon")
    s = math.sqrt(0.5)
    assert f.flatten().tolist() == pytest.approx([0.5 * 1 + s * 0.875, 0.5 * 2 + s * 2.875], rel=1e-6)
    assert torch.equal(consistency_output(eps, x, torch.tensor([0]), a, "epsilon"), x)  # identity at t = 0


def test_guided_ddim_step_by_hand():
    x = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    cond, uncond = torch.tensor([0.5, -0.5]).view(1, 1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    a, a_prev, w = torch.tensor([0.64]), torch.tensor([0.81]), torch.tensor([2.0])
    # x0_c = (x - 0.6 cond) / 0.8 = [0.875, 2.875];  x0_u = (x - 0.6 uncond) / 0.8 = [1.25, 1.75]
    # x0  = x0_c + 2 (x0_c - x0_u) = [0.875 - 0.75, 2.875 + 2.25] = [0.125, 5.125]
    # eps = cond + 2 (cond - uncond) = [0.5 + 1.0, -0.5 - 3.0] = [1.5, -3.5]
    # x_prev = sqrt(0.81) x0 + sqrt(0.19) eps = [0.1125 + 1.5 r, 4.6125 - 3.5 r], r = sqrt(0.19)
    r = math.sqrt(0.19)
    out = guided_ddim_step(cond, uncond, x, w, a, a_prev, "epsilon")
    assert out.flatten().tolist() == pytest.approx([0.1125 + 1.5 * r, 4.6125 - 3.5 * r], rel=1e-6)
    # w = 0 is the unguided (conditional) DDIM step: sqrt(a_prev) x0_c + sqrt(1 - a_prev) cond
    plain = guided_ddim_step(cond, uncond, x, torch.tensor([0.0]), a, a_prev, "epsilon")
    assert plain.flatten().tolist() == pytest.approx([0.9 * 0.875 + r * 0.5, 0.9 * 2.875 - r * 0.5], rel=1e-6)


def test_pseudo_huber_by_hand():
    # c = 1: sqrt(d^2 + 1) - 1 for d = 0, sqrt(3), -sqrt(8), sqrt(15) is 0, 1, 2, 3: mean over C,H,W = 1.5
    d = torch.tensor([0.0, math.sqrt(3), -math.sqrt(8), math.sqrt(15)]).view(1, 1, 2, 2)
    assert pseudo_huber(d, torch.zeros_like(d), 1.0).tolist() == pytest.approx([1.5], rel=1e-6)
    # the code's c = 0.001: d = 0.00075 gives sqrt(5.625e-7 + 1e-6) - 0.001 = 0.00125 - 0.001 = 0.00025 per element
    pred = torch.full((2, 1, 2, 2), 0.00075)
    target = torch.zeros_like(pred)
    target[1] = 0.00075  # second sample: distance 0
    assert pseudo_huber(pred, target, 0.001).tolist() == pytest.approx([0.00025, 0.0], abs=1e-9)


def test_boundary_scalings_match_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 19, 259, 999):
        ours = boundary_scalings(torch.tensor([float(t)]))
        theirs = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(float(t)))
        assert [v.item() for v in ours] == pytest.approx([float(v) for v in theirs], rel=1e-6)
