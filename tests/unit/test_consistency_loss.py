"""losses.ConsistencyDPOLoss: the DPO loss on consistency distances, and its beta mapped to the code's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_dpo.config import LCM_LORA_TARGETS, LossConfig, load_config
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses import ConsistencyDPOLoss, PairErrors, build_loss


def test_logit_is_the_codes_with_beta_halved():
    # d_pol_w, d_pol_l, d_ref_w, d_ref_l: Delta = (0.010 - 0.030) - (0.020 - 0.025) = -0.020 + 0.005 = -0.015
    e = PairErrors(torch.tensor([0.010]), torch.tensor([0.030]), torch.tensor([0.020]), torch.tensor([0.025]))
    out = ConsistencyDPOLoss(400.0)(e)
    # the code: -log sigmoid(-beta_code * Delta) with beta_code 200: -200 * -0.015 = 3.0
    assert out.loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(3.0)).item(), rel=1e-6)
    assert out.metrics["inside"].item() == pytest.approx(3.0, rel=1e-6)
    assert out.metrics["implicit_acc"].item() == 1.0
    same = PairErrors(torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.4]))
    assert ConsistencyDPOLoss(400.0)(same).loss.item() == pytest.approx(math.log(2))


def test_settings_defaults_and_overrides():
    loss = build_loss("consistency_dpo", 400.0, LossConfig())
    assert (loss.huber_c, loss.guidance_range, loss.solver_steps) == (0.001, (5.0, 15.0), 50)
    loss = build_loss("consistency_dpo", 400.0, LossConfig(huber_c=0.01, guidance_range=(2.0, 8.0), solver_steps=25))
    assert (loss.huber_c, loss.guidance_range, loss.solver_steps) == (0.01, (2.0, 8.0), 25)


@pytest.mark.fault(input="consistency_dpo settings out of range (`loss.huber_c=0`, `loss.guidance_range=[9,3]`, "
                         "`loss.solver_steps=0`) or `train.reference=cached`",
                   behaviour="config error naming the key")
@pytest.mark.parametrize("override, key", [("loss.huber_c=0", "loss.huber_c"),
                                           ("loss.guidance_range=[9,3]", "loss.guidance_range"),
                                           ("loss.solver_steps=0", "loss.solver_steps"),
                                           ("train.reference=cached", "train.reference")])
def test_bad_settings_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["train.method=consistency_dpo", "model.teacher=t", override])


@pytest.mark.fault(input="`model.teacher` set with another train.method", behaviour="config error naming model.teacher")
def test_teacher_without_the_method_is_refused():
    with pytest.raises(ConfigError, match="model.teacher is set but train.method 'dpo'"):
        load_config(None, ["model.teacher=t"])


def test_lora_targets_default_to_the_lcm_lora_set_only_for_this_method_and_only_when_unset():
    from diffusion_dpo.models.families import LCMFamily

    cfg = load_config(None, ["train.method=consistency_dpo", "model.teacher=t"]).with_network_defaults(
        LCMFamily.lora_targets)  # what Trainer.setup does once the family is detected
    assert cfg.lora.target_modules == list(LCM_LORA_TARGETS) and "time_emb_proj" in cfg.lora.target_modules
    explicit = load_config(None, ["train.method=consistency_dpo", "model.teacher=t", "lora.target_modules=[to_q]"])
    assert explicit.with_network_defaults(LCMFamily.lora_targets).lora.target_modules == ["to_q"]
    dpo = load_config(None, []).with_network_defaults(LCMFamily.lora_targets)
    assert dpo.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]  # dpo: the family's set
