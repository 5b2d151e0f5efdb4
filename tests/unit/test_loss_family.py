"""The DPO successors (ipo, hinge, cdpo, rdpo, kto, mapo, simpo) and soft labels: values derived by hand,
gradient signs, values at initialisation, and agreement with each paper's (or official code's) own formula
written independently here in that paper's variables."""

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_dpo.config import LOSS_KEYS, LossConfig, load_config, to_dict
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses import (LOSSES, CDPOLoss, DPOLoss, HingeLoss, IPOLoss, KTOLoss, MaPOLoss, PairErrors,
                                  RobustDPOLoss, SimPOLoss, build_loss)
from diffusion_dpo.train.run_dir import resume_differences

LN2 = math.log(2)


def pairs(pw, pl, rw=None, rl=None, prob=None, grad=False) -> PairErrors:
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return PairErrors(t(pw), t(pl), t(rw), t(rl), t(prob))


def random_pairs(n=16, seed=0, reference=True) -> PairErrors:
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(4, n, generator=g, dtype=torch.float64) * 0.2 + 0.05  # mean errors of a few percent
    return PairErrors(e[0], e[1], e[2] if reference else None, e[3] if reference else None)


def winner_grad(loss_fn, errors: PairErrors) -> torch.Tensor:
    """d loss / d e_pol(w): positive means lowering the winner's error lowers the loss."""
    errors.policy_w.requires_grad_(True)
    loss_fn(errors).loss.backward()
    return errors.policy_w.grad


def at_init(loss_fn, n=6):
    err = torch.rand(2 * n, dtype=torch.float64)
    return loss_fn(PairErrors(err[:n], err[n:], err[:n].clone(), err[n:].clone()))


# ---------------------------------------------------------------------------------------------------------
# the table and its settings
def test_every_loss_takes_exactly_its_config_keys():
    assert set(LOSSES) == set(LOSS_KEYS)
    for name, cls in LOSSES.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "beta", "args", "kwargs"}  # sft: Module's
        assert params == set(LOSS_KEYS[name]), name
    assert set(LOSS_KEYS["mapo"]) | set(LOSS_KEYS["kto"]) <= {f.name for f in dataclasses.fields(LossConfig)}


def test_build_loss_passes_set_keys_and_leaves_defaults():
    built = build_loss("cdpo", 3.0, LossConfig(label_smoothing=0.2))
    assert type(built) is CDPOLoss and (built.beta, built.eps) == (3.0, 0.2)
    assert build_loss("rdpo", 3.0, LossConfig()).eps == 0.1  # unset: the loss's default
    mapo = build_loss("mapo", 3.0, LossConfig(mapo_weight=0.5))
    assert (mapo.weight, mapo.snr, mapo.scale) == (0.5, 0.5, 1000.0)
    assert build_loss("dpo", 1.0, LossConfig(soft_labels=True)).soft_labels


def test_reference_free_losses_request_no_reference():
    for cls in (MaPOLoss, SimPOLoss):
        assert (cls.needs_reference, cls.needs_losers) == (False, True)
    for cls in (IPOLoss, HingeLoss, CDPOLoss, RobustDPOLoss, KTOLoss):
        assert (cls.needs_reference, cls.needs_losers) == (True, True)
    # and they compute without one
    e = random_pairs(reference=False)
    assert torch.isfinite(MaPOLoss()(e).loss) and torch.isfinite(SimPOLoss(2000.0)(e).loss)


@pytest.mark.fault(input="a loss.* key set for a loss that does not read it (`loss.simpo_gamma`, `train.method=dpo`)",
                   behaviour="config error naming the key, the method and the losses that use it")
def test_a_key_for_another_loss_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"loss.simpo_gamma is set but train.method 'dpo' does not use it "
                                          r"\(it is for simpo\); remove loss.simpo_gamma or change train.method"):
        load_config(None, ["loss.simpo_gamma=1.0"])
    with pytest.raises(ConfigError, match=r"loss.label_smoothing is set but train.method 'kto' .*cdpo, rdpo"):
        load_config(None, ["train.method=kto", "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"loss.simpo_gamma is set but train.method 'mapo'"):
        load_config(None, ["train.method=mapo", "loss.simpo_gamma=0"])  # a zero is set too
    with pytest.raises(ConfigError, match=r"loss.soft_labels is set but train.method 'ipo'"):
        load_config(None, ["train.method=ipo", "loss.soft_labels=true"])
    cfg = load_config(None, ["train.method=mapo", "loss.mapo_weight=0.2", "loss.mapo_snr=1.0"])
    assert (cfg.loss.mapo_weight, cfg.loss.mapo_snr, cfg.loss.mapo_scale) == (0.2, 1.0, None)


@pytest.mark.fault(input="a loss setting out of range (`loss.label_smoothing=0.5` with `rdpo`, a weight <= 0)",
                   behaviour="config error naming the key and its range")
def test_out_of_range_loss_settings_are_refused():
    load_config(None, ["train.method=cdpo", "loss.label_smoothing=0.5"])  # cdpo allows 1/2 (a coin flip)
    with pytest.raises(ConfigError, match=r"loss.label_smoothing must be in \[0, 0.5\) \(rdpo divides by 1 - 2\*eps\) "
                                          r"for train.method 'rdpo', got 0.5"):
        load_config(None, ["train.method=rdpo", "loss.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match=r"loss.label_smoothing must be in \[0, 0.5\] for train.method 'cdpo'"):
        load_config(None, ["train.method=cdpo", "loss.label_smoothing=-0.1"])
    with pytest.raises(ConfigError, match="loss.simpo_gamma must be >= 0, got -1.0"):
        load_config(None, ["train.method=simpo", "loss.simpo_gamma=-1"])
    with pytest.raises(ConfigError, match="loss.kto_undesirable_weight must be > 0, got 0.0"):
        load_config(None, ["train.method=kto", "loss.kto_undesirable_weight=0"])
    with pytest.raises(ConfigError, match="train.beta must be > 0 for method 'ipo', got 0.0"):
        load_config(None, ["train.method=ipo", "train.beta=0"])
    with pytest.raises(ConfigError, match="train.method: 'orpo' is not one of"):
        load_config(None, ["train.method=orpo"])


def test_a_changed_loss_setting_blocks_a_resume_like_other_result_keys():
    saved = to_dict(load_config(None, ["train.method=cdpo", "loss.label_smoothing=0.1"]))
    changed = load_config(None, ["train.method=cdpo", "loss.label_smoothing=0.2"])
    assert resume_differences(saved, changed) == {"loss.label_smoothing": (0.1, 0.2)}


# ---------------------------------------------------------------------------------------------------------
# IPO
def test_ipo_by_hand():
    # beta = tau = 1, reference errors 1.5 for both images: target margin 1/(2 tau) = 0.5
    # pair 0: Delta = (1 - 1.5) - (2 - 1.5) = -1, h = -Delta/2 = 0.5 -> (0.5 - 0.5)^2 = 0   (at the optimum)
    # pair 1: Delta = (2 - 1.5) - (1 - 1.5) = +1, h = -0.5        -> (-0.5 - 0.5)^2 = 1
    out = IPOLoss(1.0)(pairs([1.0, 2.0], [2.0, 1.0], [1.5, 1.5], [1.5, 1.5]))
    assert out.per_pair.tolist() == [0.0, 1.0] and out.loss.item() == 0.5
    # at initialisation h = 0: 1/(4 tau^2) = 1/64 for tau = 4
    assert at_init(IPOLoss(4.0)).loss.item() == pytest.approx(1 / 64, rel=1e-12)


def test_ipo_gradient_sign_pushes_to_the_target_and_not_past_it():
    # below the target (h = 0): lowering the winner's error lowers the loss
    assert winner_grad(IPOLoss(1.0), pairs([1.5], [1.5], [1.5], [1.5]))[0] > 0
    # past the target (h = 1 > 0.5): lowering the winner's error further RAISES the loss (DPO would keep going)
    assert winner_grad(IPOLoss(1.0), pairs([0.5], [2.5], [1.5], [1.5]))[0] < 0


def test_ipo_agrees_with_the_paper_on_random_errors():
    # Azar et al. eq. 17: (h(y_w, y_l) - 1/(2 tau))^2, h = log[pi(y_w) pi_ref(y_l) / (pi(y_l) pi_ref(y_w))],
    # with the diffusion log-likelihood log pi(x) = -e(x)/2 + const (the official code's convention)
    e, tau = random_pairs(), 2000.0
    logp = lambda err: -err / 2  # noqa: E731
    h = logp(e.policy_w) + logp(e.ref_l) - logp(e.policy_l) - logp(e.ref_w)
    assert torch.allclose(IPOLoss(tau)(e).per_pair, (h - 1 / (2 * tau)) ** 2, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# hinge
def test_hinge_by_hand_init_and_gradient():
    # beta 1: pair 0 logit = -1/2 * (-1) = 0.5 -> max(0, 1 - 0.5) = 0.5; pair 1 logit -0.5 -> 1.5; mean 1
    out = HingeLoss(1.0)(pairs([1.0, 2.0], [2.0, 1.0], [1.5, 1.5], [1.5, 1.5]))
    assert out.per_pair.tolist() == [0.5, 1.5] and out.loss.item() == 1.0
    assert at_init(HingeLoss(2000.0)).loss.item() == 1.0
    assert winner_grad(HingeLoss(1.0), pairs([1.5], [1.5], [1.5], [1.5]))[0] > 0
    # logit 4 >= 1: the margin is met, no gradient at all
    assert winner_grad(HingeLoss(1.0), pairs([0.5], [4.5], [1.5], [1.5]))[0] == 0


def test_hinge_agrees_with_slic_on_random_errors():
    # the SLiC-HF hinge with delta = 1 and the DPO score beta * h: max(0, delta - beta * h), h as in the IPO test
    e, beta = random_pairs(seed=1), 2000.0
    h = (-(e.policy_w - e.ref_w) + (e.policy_l - e.ref_l)) / 2
    assert torch.allclose(HingeLoss(beta)(e).per_pair, torch.clamp(1 - beta * h, min=0), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# cDPO and robust DPO
def test_cdpo_and_rdpo_by_hand():
    # logit z = ln 3 (beta 2, policy errors (-ln 3, 0), reference 0): sigmoid(z) = 3/4, sigmoid(-z) = 1/4
    e = lambda: pairs([-math.log(3)], [0.0], [0.0], [0.0])  # noqa: E731
    # cdpo, eps 1/4: -(3/4) ln(3/4) - (1/4) ln(1/4) = 0.75 * 0.2876821 + 0.25 * 1.3862944 = 0.5623351
    assert CDPOLoss(2.0, 0.25)(e()).loss.item() == pytest.approx(0.5623351, abs=1e-7)
    # rdpo: [0.2157616 - 0.3465736] / (1 - 2/4) = -0.261624
    assert RobustDPOLoss(2.0, 0.25)(e()).loss.item() == pytest.approx(-0.261624, abs=1e-6)
    # z = log((1 - eps)/eps) is cdpo's minimum: no gradient there; rdpo keeps pushing like DPO
    assert winner_grad(CDPOLoss(2.0, 0.25), e())[0].item() == pytest.approx(0.0, abs=1e-12)
    assert winner_grad(RobustDPOLoss(2.0, 0.25), e())[0] > 0
    for cls in (CDPOLoss, RobustDPOLoss):
        assert at_init(cls(2000.0, 0.3)).loss.item() == pytest.approx(LN2, abs=1e-12)
        assert winner_grad(cls(2.0, 0.1), pairs([1.5], [1.5], [1.5], [1.5]))[0] > 0
        # eps = 0 is DPO exactly
        r = random_pairs(seed=2)
        assert torch.allclose(cls(2000.0, 0.0)(r).per_pair, DPOLoss(2000.0)(r).per_pair, rtol=1e-12)


def test_rdpo_is_unbiased_under_label_flips_as_its_paper_proves():
    # Chowdhury et al. (Provably Robust DPO), its unbiasedness result: flipping each label with probability eps,
    # E[loss_rdpo] = (1 - eps) l(z) + eps l(-z) equals the clean DPO loss -log sigmoid(z)
    r, eps = random_pairs(seed=3), 0.2
    flipped = PairErrors(r.policy_l, r.policy_w, r.ref_l, r.ref_w)  # w and l swapped: logit -z
    loss = RobustDPOLoss(2000.0, eps)
    expected = (1 - eps) * loss(r).per_pair + eps * loss(flipped).per_pair
    assert torch.allclose(expected, DPOLoss(2000.0)(r).per_pair, rtol=1e-10)
    # cdpo is the cross-entropy against the smoothed target (Mitchell's note), written out
    z = DPOLoss(2000.0)(r).metrics["inside"]  # mean logit, checked per pair below
    logit = -1000.0 * ((r.policy_w - r.ref_w) - (r.policy_l - r.ref_l))
    target = torch.full_like(logit, 1 - eps)
    assert torch.allclose(CDPOLoss(2000.0, eps)(r).per_pair,
                          F.binary_cross_entropy_with_logits(logit, target, reduction="none"), rtol=1e-10)
    assert z.item() == pytest.approx(logit.mean().item())


# ---------------------------------------------------------------------------------------------------------
# soft labels
def test_soft_labels_by_hand_and_hard_label_limit():
    # logit 1 (beta 2, policy (1, 2), reference (1.5, 1.5)); p = 3/4:
    # -0.75 ln sigmoid(1) - 0.25 ln sigmoid(-1) = 0.75 * 0.3132617 + 0.25 * 1.3132617 = 0.5632617
    soft = DPOLoss(2.0, soft_labels=True)
    assert soft(pairs([1.0], [2.0], [1.5], [1.5], prob=[0.75])).loss.item() == pytest.approx(0.5632617, abs=1e-7)
    r, soft = random_pairs(seed=4), DPOLoss(2000.0, soft_labels=True)
    r.pref_prob = torch.ones(16, dtype=torch.float64)  # p = 1: the hard-label loss
    assert torch.allclose(soft(r).per_pair, DPOLoss(2000.0)(r).per_pair, rtol=1e-12)
    r.pref_prob = torch.full((16,), 0.5, dtype=torch.float64)  # p = 1/2: ln 2 at initialisation, any logit
    assert soft(PairErrors(r.policy_w, r.policy_l, r.policy_w, r.policy_l, r.pref_prob)).loss.item() == \
        pytest.approx(LN2, abs=1e-12)
    # off (the default): the probability is not read
    r.pref_prob = torch.zeros(16, dtype=torch.float64)
    assert torch.equal(DPOLoss(2000.0)(r).per_pair, DPOLoss(2000.0)(PairErrors(*dataclasses.astuple(r)[:4])).per_pair)
    # a pair with p < 1/2 prefers the loser: lowering the winner's error raises its loss at logit 0
    assert winner_grad(DPOLoss(2.0, soft_labels=True), pairs([1.5], [1.5], [1.5], [1.5], prob=[0.2]))[0] < 0


@pytest.mark.fault(input="`loss.soft_labels=true` on data without a preference probability per pair",
                   behaviour="error naming loss.soft_labels and the two fixes")
def test_soft_labels_without_probabilities_is_an_error():
    with pytest.raises(ConfigError, match="loss.soft_labels is on but the data carries no preference probability"):
        DPOLoss(2.0, soft_labels=True)(pairs([1.0], [2.0], [1.5], [1.5]))


# ---------------------------------------------------------------------------------------------------------
# Diffusion-KTO
def test_kto_by_hand_with_unequal_counts():
    # beta 2, so r = -(e_pol - e_ref). One desirable image (w row), two undesirable ones (l rows):
    # r_d = -(1.0 - 1.5) = 0.5; r_u = -(1.0 - 1.5), -(2.0 - 1.5) = 0.5, -0.5
    # reference point = max(0, (0.5 + 0.5 - 0.5) / 3) = 1/6
    # desirable:   1 - sigmoid(0.5 - 1/6)  = 1 - sigmoid(1/3)
    # undesirable: 1 - sigmoid(1/6 - 0.5)  = 1 - sigmoid(-1/3);  1 - sigmoid(1/6 + 0.5) = 1 - sigmoid(2/3)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - s(1 / 3), 1 - s(-1 / 3), 1 - s(2 / 3)]
    out = KTOLoss(2.0)(pairs([1.0], [1.0, 2.0], [1.5], [1.5, 1.5]))
    assert out.per_pair.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, abs=1e-12)
    assert out.metrics["kto_reference_point"].item() == pytest.approx(1 / 6)
    # every reward negative: the mean is clamped, the reference point is 0
    # r_d = -0.5, r_u = -0.5: loss_d = 1 - sigmoid(-0.5), loss_u = 1 - sigmoid(0.5); weights 2 and 3
    out = KTOLoss(2.0, 2.0, 3.0)(pairs([2.0], [2.0], [1.5], [1.5]))
    assert out.metrics["kto_reference_point"].item() == 0.0
    assert out.per_pair.tolist() == pytest.approx([2 * (1 - s(-0.5)), 3 * (1 - s(0.5))], abs=1e-12)
    # initialisation: every image contributes lambda / 2
    assert at_init(KTOLoss(2000.0)).loss.item() == 0.5


def test_kto_micro_batch_with_one_label_only_has_finite_metrics():
    # labelled single images: a micro-batch may hold no undesirable image. Two desirable ones, beta 2:
    # r = -(1.0 - 1.5) = 0.5 and -(2.0 - 1.5) = -0.5; reference point max(0, 0) = 0; loss 1 - sigmoid(r) each.
    # The empty group's means read 0 (NaN would stop the run as a non-finite step).
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = KTOLoss(2.0)(pairs([1.0, 2.0], [], [1.5, 1.5], []))
    assert out.per_pair.tolist() == pytest.approx([1 - s(0.5), 1 - s(-0.5)], abs=1e-12)
    assert all(math.isfinite(v.item()) for v in out.metrics.values()), out.metrics
    assert out.metrics["reward_undesirable"].item() == 0.0 and out.metrics["err_policy_l"].item() == 0.0
    assert out.metrics["reward_desirable"].item() == 0.0  # (0.5 - 0.5) / 2


def test_kto_gradient_signs():
    e = pairs([1.0], [1.0], [1.2], [1.1], grad=True)
    KTOLoss(2.0)(e).loss.backward()
    assert e.policy_w.grad[0] > 0  # lowering a desirable image's error lowers the loss
    assert e.policy_l.grad[0] < 0  # lowering an undesirable one's raises it
    assert e.ref_w.grad is None  # the reference point and the reference errors carry no gradient


def test_kto_agrees_with_the_official_code_on_random_errors():
    # jacklishufan/diffusion-kto, train_kto_sd_v1.5.py (its "eq 8" step is g - kl): g = -(model_loss - ref_loss),
    # kl = clamp(mean(g), 0), h = sigmoid(sign * beta_kto * (g - kl)), loss = mean(w_y * (1 - h)),
    # with beta_kto = our beta / 2; labels 1 desirable, 0 undesirable
    r, beta, lam_d, lam_u = random_pairs(seed=5), 2000.0, 1.0, 1.5
    model = torch.cat([r.policy_w, r.policy_l])
    ref = torch.cat([r.ref_w, r.ref_l])
    labels = torch.cat([torch.ones(16), torch.zeros(16)]).double()
    g = -(model - ref)
    kl = g.mean().clamp(min=0)
    h = torch.sigmoid((2 * labels - 1) * (beta / 2) * (g - kl))
    w_y = lam_d * labels + lam_u * (1 - labels)
    official = (w_y * (1 - h)).mean()
    assert KTOLoss(beta, lam_d, lam_u)(r).loss.item() == pytest.approx(official.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# MaPO
def test_mapo_by_hand():
    # s = 1/2, T = 10, lambda = 0.1; e_w = 2 ln 2 -> s e = ln 2 -> f = ln 2 / (2 - 1) = 0.6931472
    # e_l = 2 ln 3 -> s e = ln 3 -> f = ln 3 / (3 - 1) = 0.5493061; margin = 0.1438410
    # margin term = -log sigmoid(10 * 0.1438410) = ln(1 + e^-1.438410) = ln(1.2373047) = 0.2129354
    # loss = e_w + 0.1 * 0.2129354 = 1.3862944 + 0.0212935 = 1.4075879
    out = MaPOLoss(0.1, 0.5, 10.0)(pairs([2 * math.log(2)], [2 * math.log(3)]))
    assert out.metrics["mapo_margin"].item() == pytest.approx(0.1438410, abs=1e-7)
    assert out.loss.item() == pytest.approx(1.4075879, abs=1e-7)
    # equal errors: margin 0, the term is ln 2 (the reference-free analogue of the DPO start)
    assert MaPOLoss(0.1, 0.5, 10.0)(pairs([0.3], [0.3])).loss.item() == pytest.approx(0.3 + 0.1 * LN2, abs=1e-12)
    # f's limit at e = 0 is 1, not 0/0
    assert MaPOLoss(1.0, 0.5, 1.0)(pairs([0.0], [0.0])).loss.item() == pytest.approx(LN2, abs=1e-12)


def test_mapo_gradient_sign():
    assert winner_grad(MaPOLoss(), pairs([0.1], [0.1]))[0] > 0  # both terms fall with the winner's error
    e = pairs([0.1], [0.1], grad=True)
    MaPOLoss()(e).loss.backward()
    assert e.policy_l.grad[0] < 0  # raising the loser's error lowers the loss


def test_mapo_agrees_with_the_official_code_on_random_errors():
    # mapo-t2i/mapo train.py: log_odds = (s e_w)/(exp(s e_w) - 1) - (s e_l)/(exp(s e_l) - 1);
    # ratio = logsigmoid(log_odds * T); loss = e_w.mean() - beta_mapo * ratio.mean()
    r, s, T, lam = random_pairs(seed=6, reference=False), 0.5, 1000.0, 0.1
    log_odds = (s * r.policy_w) / (torch.exp(s * r.policy_w) - 1) - (s * r.policy_l) / (torch.exp(s * r.policy_l) - 1)
    official = r.policy_w.mean() - lam * F.logsigmoid(log_odds * T).mean()
    assert MaPOLoss(lam, s, T)(r).loss.item() == pytest.approx(official.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------------------
# SimPO style
def test_simpo_by_hand_and_margin_sign():
    # beta 2, policy (1, 2): logit = -1 * (1 - 2) = 1; gamma 0.5: -log sigmoid(1 - 0.5) = ln(1 + e^-0.5) = 0.4740770
    e = lambda: pairs([1.0], [2.0])  # noqa: E731
    assert SimPOLoss(2.0, 0.5)(e()).loss.item() == pytest.approx(0.4740770, abs=1e-7)
    # the margin is demanded: gamma > 0 makes the loss LARGER than gamma = 0 (ln(1 + e^-1) = 0.3132617);
    # a port with the sign flipped would make it smaller
    assert SimPOLoss(2.0, 0.0)(e()).loss.item() == pytest.approx(0.3132617, abs=1e-7)
    assert winner_grad(SimPOLoss(2.0, 0.5), e())[0] > 0


def test_simpo_agrees_with_the_paper_on_random_errors():
    # Meng et al. eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), with the
    # length-normalised log-likelihood of an image = -(mean error)/2 (errors are means over latent elements)
    r, beta, gamma = random_pairs(seed=7, reference=False), 2000.0, 0.7
    avg_logp = lambda err: -err / 2  # noqa: E731
    paper = -F.logsigmoid(beta * avg_logp(r.policy_w) - beta * avg_logp(r.policy_l) - gamma)
    assert torch.allclose(SimPOLoss(beta, gamma)(r).per_pair, paper, rtol=1e-12)
