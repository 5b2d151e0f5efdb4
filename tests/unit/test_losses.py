"""Diffusion-DPO and SFT loss values derived by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses import LOSSES, DPOLoss, PairErrors, SFTLoss, build_loss, dpo_logit
from diffusion_dpo.models.diffusion import per_sample_error, split_pairs


def stacked(err_policy: torch.Tensor, err_ref: torch.Tensor) -> PairErrors:
    """Errors of 2B stacked rows (winners first, as the step computes them) as the loss's named tensors."""
    return PairErrors(*split_pairs(err_policy), *split_pairs(err_ref))


def test_loss_is_ln2_when_policy_equals_reference():
    err = torch.rand(8)  # 4 pairs
    out = DPOLoss(beta=5000)(stacked(err, err.clone()))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.all(out.per_pair == out.per_pair[0])
    assert out.metrics["implicit_acc"].item() == 0.0  # inside == 0 is not > 0
    assert out.metrics["inside"].item() == 0.0


def test_known_small_example():
    # one pair; policy: err_w = 1.0, err_l = 2.0; reference: 1.5, 1.5; beta = 2
    # diff_policy = -1, diff_ref = 0, inside = -0.5 * 2 * (-1 - 0) = 1, loss = -log(sigmoid(1)) = log(1 + e^-1)
    out = DPOLoss(beta=2.0)(stacked(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.5])))
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out.loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 1.0
    assert out.metrics["diff_policy"].item() == -1.0
    # two pairs: second pair has inside = -0.5 * 2 * ((3 - 1) - (0 - 0)) = -2
    out = DPOLoss(beta=2.0)(stacked(torch.tensor([1.0, 3.0, 2.0, 1.0]), torch.tensor([1.5, 0.5, 1.5, 0.5])))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["implicit_acc"].item() == 0.5


def official_loss(model_pred, ref_pred, target, beta):
    """The official training script's computation, written out as it appears there."""
    model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    return -1 * F.logsigmoid(inside_term).mean(), implicit_acc


def test_agrees_with_official_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    for beta in (1.0, 2000.0, 5000.0):
        pred, ref, target = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
        ref = target + 0.5 * (ref - target)
        pred = ref + 0.01 * torch.randn(6, 4, 8, 8, generator=g)
        out = DPOLoss(beta)(stacked(per_sample_error(pred, target), per_sample_error(ref, target)))
        loss, acc = official_loss(pred, ref, target, beta)
        assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
        assert out.metrics["implicit_acc"].item() == acc.item()
        if beta < 1000:
            continue  # at small beta logsigmoid is nearly linear over the inside values
        # averaging inside terms before the log-sigmoid (a porting bug) gives a different value
        inside = -0.5 * beta * ((per_sample_error(pred, target)[:3] - per_sample_error(pred, target)[3:])
                                - (per_sample_error(ref, target)[:3] - per_sample_error(ref, target)[3:]))
        assert not math.isclose(out.loss.item(), -F.logsigmoid(inside.mean()).item(), rel_tol=1e-4)


def test_lowering_policy_error_on_winners_lowers_the_loss():
    err_ref = torch.tensor([1.0, 1.0, 1.0, 1.0])
    err_policy = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    loss = DPOLoss(beta=10.0)
    base = loss(stacked(err_policy, err_ref)).loss
    base.backward()
    assert torch.all(err_policy.grad[:2] > 0)  # d loss / d err_w > 0: lower winner error -> lower loss
    assert torch.all(err_policy.grad[2:] < 0)  # d loss / d err_l < 0: higher loser error -> lower loss
    better = loss(stacked(torch.tensor([0.9, 0.9, 1.0, 1.0]), err_ref)).loss
    worse = loss(stacked(torch.tensor([1.1, 1.1, 1.0, 1.0]), err_ref)).loss
    assert better.item() < base.item() < worse.item()


def test_sum_reduction_is_mean_times_elements():
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    mean = per_sample_error(pred, target, "mean")
    summed = per_sample_error(pred, target, "sum")
    assert torch.allclose(summed, mean * 4 * 8 * 8, rtol=1e-5)
    # the same loss with beta scaled down by C*H*W
    err_ref = per_sample_error(torch.randn(4, 4, 8, 8), target)
    a = DPOLoss(beta=256.0)(stacked(mean, err_ref)).loss
    b = DPOLoss(beta=1.0)(stacked(summed, err_ref * 256)).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_sft_is_mean_winner_error_and_table():
    err_w = torch.tensor([0.5, 1.5])
    assert SFTLoss()(PairErrors(err_w)).loss.item() == pytest.approx(1.0)
    assert isinstance(build_loss("dpo", 3.0), DPOLoss) and build_loss("dpo", 3.0).beta == 3.0
    assert isinstance(build_loss("sft", 3.0), SFTLoss)
    with pytest.raises(ValueError, match="unknown train.method"):
        build_loss("orpo", 1.0)


def test_reference_errors_get_no_gradient_and_policy_errors_do():
    # the loss detaches err_ref itself: a caller that forgot torch.no_grad() must not train the reference
    err_policy = torch.tensor([1.0, 2.0, 1.5, 0.5], requires_grad=True)
    err_ref = torch.tensor([1.5, 1.5, 1.0, 1.0], requires_grad=True)
    ref_net_weight = torch.tensor(1.0, requires_grad=True)  # a parameter upstream of the reference errors
    out = DPOLoss(beta=2.0)(stacked(err_policy, err_ref * ref_net_weight))
    out.loss.backward()
    assert err_ref.grad is None and ref_net_weight.grad is None
    # d loss / d err_policy by hand: loss = mean_i -logsigmoid(inside_i), inside_i = -0.5 beta (pw_i - pl_i - rdiff_i)
    # d/d pw_i = -(1 - sigmoid(inside_i)) * (-0.5 beta) / B = (1 - sigmoid(inside_i)) * beta / (2 B); d/d pl_i = -that
    inside = -0.5 * 2.0 * ((torch.tensor([1.0, 2.0]) - torch.tensor([1.5, 0.5])) - (torch.tensor([1.5, 1.5]) - 1.0))
    g = (1 - torch.sigmoid(inside)) * 2.0 / (2 * 2)
    assert torch.allclose(err_policy.grad, torch.cat([g, -g]), atol=1e-7)


def test_dpo_logit_by_hand_and_used_by_the_loss():
    # pair 0: policy (1.0, 2.0), reference (1.5, 1.5), beta 2: -2/2 * ((1 - 2) - (1.5 - 1.5)) = 1
    # pair 1: policy (3.0, 1.0), reference (0.5, 0.5), beta 2: -1 * ((3 - 1) - 0) = -2
    pw, pl = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    rw, rl = torch.tensor([1.5, 0.5]), torch.tensor([1.5, 0.5])
    assert torch.equal(dpo_logit(pw, pl, rw, rl, beta=2.0), torch.tensor([1.0, -2.0]))
    # beta scales the logit, never its sign; a reference that moved like the policy cancels it
    assert torch.equal(dpo_logit(pw, pl, rw, rl, beta=4.0), torch.tensor([2.0, -4.0]))
    assert torch.equal(dpo_logit(pw, pl, pw, pl, beta=5000.0), torch.zeros(2))
    out = DPOLoss(beta=2.0)(PairErrors(pw, pl, rw, rl))
    assert out.metrics["inside"].item() == pytest.approx(-0.5)  # the mean DPO logit
    assert torch.allclose(out.per_pair, -F.logsigmoid(torch.tensor([1.0, -2.0])))


def test_build_loss_picks_from_the_losses_table(monkeypatch):
    class Hinge(DPOLoss):
        """A stand-in for a later loss: registered in LOSSES, built by name."""

    monkeypatch.setitem(LOSSES, "hinge", Hinge)
    built = build_loss("hinge", 7.0)
    assert type(built) is Hinge and built.beta == 7.0
    with pytest.raises(ConfigError, match=r"unknown train.method 'orpo'; choose one of \['cdpo', 'consistency_dpo', 'dpo', 'hinge', "):
        build_loss("orpo", 1.0)


def test_sft_needs_neither_losers_nor_reference():
    assert (SFTLoss.needs_losers, SFTLoss.needs_reference) == (False, False)
    assert (DPOLoss.needs_losers, DPOLoss.needs_reference) == (True, True)
    out = SFTLoss()(PairErrors(torch.tensor([0.25, 0.75]), policy_l=None, ref_w=None, ref_l=None))
    assert out.loss.item() == 0.5 and torch.equal(out.per_pair, torch.tensor([0.25, 0.75]))
