"""demo.distill_lcm: latent consistency distillation of a tiny SD pipeline into an LCM, checked by hand."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_dpo.demo.distill_lcm import DistillSettings, Distiller, distill, student_from_teacher
from diffusion_dpo.models.encode import guidance_embedding


@pytest.fixture(scope="module")
def teacher(tiny_sd):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    return unet, DDPMScheduler.from_pretrained(tiny_sd / "scheduler")


def _inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)


def test_student_starts_as_the_teachers_conditional_network_for_every_w(teacher):
    unet, _ = teacher
    student = student_from_teacher(unet, cond_dim=8)
    assert student.config.time_cond_proj_dim == 8 and unet.config.time_cond_proj_dim is None
    x, cond, _ = _inputs()
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond).sample
        for w in (0.0, 3.0, 14.0):
            out = student(x, t, encoder_hidden_states=cond,
                          timestep_cond=guidance_embedding(torch.full((3,), w + 1), 8)).sample
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _hand_loss(unet, alphas, x0, cond, empty, index, w, noise, k, c):
    """The LCD loss written out from the LCM paper / diffusers script formulas, student = target = teacher."""
    s = (index + 1) * k - 1
    t = (s - k).clamp(min=0)
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    a_s, a_t = col(alphas[s]), col(alphas[t])
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * noise
    with torch.no_grad():
        e_c = unet(x_s, s, encoder_hidden_states=cond).sample
        e_u = unet(x_s, s, encoder_hidden_states=empty.expand_as(cond)).sample
    x0_c, x0_u = (x_s - (1 - a_s).sqrt() * e_c) / a_s.sqrt(), (x_s - (1 - a_s).sqrt() * e_u) / a_s.sqrt()
    x0_g, e_g = x0_c + col(w) * (x0_c - x0_u), e_c + col(w) * (e_c - e_u)
    x_t = a_t.sqrt() * x0_g + (1 - a_t).sqrt() * e_g

    def f(x, tt, a):  # c_skip x + c_out x0_hat with the teacher's own (conditional) prediction
        with torch.no_grad():
            e = unet(x, tt, encoder_hidden_states=cond).sample
        x0_hat = (x - (1 - a).sqrt() * e) / a.sqrt()
        z = col(tt.float() * 10)
        return 0.25 / (z ** 2 + 0.25) * x + z / (z ** 2 + 0.25).sqrt() * x0_hat

    d = (f(x_s, s, a_s) - f(x_t, t, a_t)).flatten(1)
    return ((d ** 2 + c * c).sqrt() - c).mean()


def test_loss_at_init_is_the_hand_written_lcd_loss_of_the_teacher(teacher):
    unet, sched = teacher
    s = DistillSettings(solver_steps=50, w_min=1.0, w_max=4.0, huber_c=0.001, cond_dim=8)
    d = Distiller(unet, sched, s)
    x0, cond, empty = _inputs()
    g = torch.Generator().manual_seed(7)
    loss = d.loss(x0, cond, empty, g)
    # the same draws, in the module's order: solver index, w, noise
    g = torch.Generator().manual_seed(7)
    index = torch.randint(0, 50, (3,), generator=g)
    w = 1.0 + 3.0 * torch.rand((3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    expected = _hand_loss(unet, sched.alphas_cumprod, x0, cond, empty, index, w, noise, 20, 0.001)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and loss.item() > 0


def test_consistency_output_is_the_identity_at_t0(teacher):
    unet, sched = teacher
    d = Distiller(unet, sched, DistillSettings(cond_dim=8))
    x, cond, _ = _inputs()
    out = d.consistency(d.student, x, torch.zeros(3, dtype=torch.long), torch.full((3,), 2.0), cond)
    torch.testing.assert_close(out, x)  # c_skip(0) = 1, c_out(0) = 0


def test_loss_decreases_on_a_fixed_batch_and_the_target_follows_by_ema(teacher):
    unet, sched = teacher
    s = DistillSettings(cond_dim=8, ema_decay=0.9)
    d = Distiller(unet, sched, s)
    x0, cond, empty = _inputs(n=4)
    opt = torch.optim.Adam(d.student.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        loss = d.loss(x0, cond, empty, torch.Generator().manual_seed(3))  # the same draws every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = [p.detach().clone() for p in d.target.parameters()]
        d.update_target()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    # target <- 0.9 target + 0.1 student
    for b, pt, p in zip(before, d.target.parameters(), d.student.parameters()):
        torch.testing.assert_close(pt, 0.9 * b + 0.1 * p.detach())


def test_distilled_folder_is_an_lcm_pipeline_for_the_toolkit_and_stock_diffusers(tiny_sd, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from diffusion_dpo.models.families import detect_spec, family_of

    out = distill(DistillSettings(out=str(tmp_path / "lcm"), base=str(tiny_sd), steps=3, batch_size=2,
                                  num_images=8, cond_dim=8, threads=1, solver_steps=25), log=lambda _: None)
    record = json.loads((out / "distill.json").read_text())
    assert len(record["loss"]) == 3 and record["settings"]["solver_steps"] == 25
    assert family_of(detect_spec(str(out))).name == "lcm"
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True)  # stock call
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 25
    pipe.set_progress_bar_config(disable=True)
    image = pipe(["a red circle"], num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@pytest.mark.fault(input="`distill_lcm --loss l1` (not huber or l2)", behaviour="one-line config error naming --loss")
def test_unknown_loss_is_refused():
    from diffusion_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match="--loss 'l1'"):
        DistillSettings(loss="l1")
