"""Consistency-DPO from data source to loss (train.method=consistency_dpo, latent consistency models): the
consistency counterpart of train.batch's pairs, chosen once by train.batch.open_pairs.

    pairs = ConsistencyPairs(inner)                    # any pairs: images encoded on the fly or a prepared cache
    encoder = pairs.encoder(cfg, family, device)       # the inner encoder + the frozen teacher
    batch = encoder(raw)                               # -> ConsistencyBatch: x_{s_n} and the teacher's x_{t_n}
    errors = consistency_errors(policy, reference, family, scheduler, batch)   # train.step dispatches here

Per pair (Curriculum-DPO's code, after diffusers' train_lcm_distill_sd_wds.py), shared by winner and loser: the
solver index n, the noise and the guidance w ~ U[low, high]. n comes from the pair's own timestep draw
(family.draw_items, uniform in train.timestep_range): n = t // k, so the default range gives n uniform on
[0, steps), as the code's randint; w from a second per-pair generator (the family's draws stay as every other
method's). The teacher step is frozen work on the data, like the VAE's, so the encoder does it:

    x_s    = sqrt(a_s) x0 + sqrt(1 - a_s) noise                              s = s_n
    x_prev = guided DDIM step of the teacher (cond and "" prompts), x_s -> x_{t_n}      (models.consistency)
    target = f_ref(x_prev, t_n, w)      d_pol = pseudo-Huber(f_pol(x_s, s, w), target)
                                        d_ref = pseudo-Huber(f_ref(x_s, s, w), target)

f is the consistency output c_skip x + c_out x0_hat; the networks get w through their guidance embedding (the
pipeline's scale w + 1, embedded as w * 1000). d_ref plays err_ref, so losses.ConsistencyDPOLoss is DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from diffusion_dpo.config import RunConfig
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.losses import PairErrors, build_loss
from diffusion_dpo.models.consistency import consistency_output, guided_ddim_step, pseudo_huber, solver_timesteps
from diffusion_dpo.models.diffusion import pair_generator, split_pairs
from diffusion_dpo.models.encode import TextConditioning
from diffusion_dpo.models.loading import freeze
from diffusion_dpo.runtime import torch_dtype

_GUIDANCE_STREAM = 0x5EED_C0DE
"""Offset of the per-pair generator seed w is drawn from (a stream apart from the family's draws)."""


def settings(cfg: RunConfig) -> dict[str, Any]:
    """huber_c, guidance_range, solver_steps: the loss.* values, the loss's defaults where unset."""
    loss = build_loss(cfg.train.method, cfg.train.beta, cfg.loss)  # a ConsistencyDPOLoss: the settings' one home
    return {"huber_c": loss.huber_c, "guidance_range": loss.guidance_range, "solver_steps": loss.solver_steps}


def draw_guidance(seed: int, epochs: torch.Tensor, indices: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """w ~ U[low, high] per pair (B,), float32, from a generator seeded by (seed, epoch, index) like the pair's
    other draws: independent of batch size, processes and resume."""
    out = []
    for e, i in zip(epochs, indices):
        g = torch.Generator().manual_seed((pair_generator(seed, int(e), int(i)).initial_seed() + _GUIDANCE_STREAM)
                                          % (2**63 - 1))
        out.append(low + (high - low) * torch.rand((1,), generator=g))
    return torch.cat(out)


@dataclass
class ConsistencyBatch:
    """B pairs ready for the consistency distances; (2B, ...) rows, winners first, pair i = rows i and B+i."""

    noisy: torch.Tensor  # (2B, C, h, w) x_s: the pair's clean latents noised with its one noise at s
    teacher_prev: torch.Tensor  # (2B, C, h, w) x_{t_n}: the guided teacher's DDIM step from x_s
    start: torch.Tensor  # int64 (2B,) s_n
    prev: torch.Tensor  # int64 (2B,) t_n
    guidance: torch.Tensor  # float32 (2B,) the pipeline's guidance scale w + 1 (the networks' embedding input)
    cond: TextConditioning  # (2B, L, D)
    pair_cond: Optional[torch.Tensor]  # family.pair_conditioning rows (2B, ...) or None
    huber_c: float  # loss.huber_c

    @property
    def size(self) -> int:
        return self.noisy.shape[0] // 2


def load_teacher(cfg: RunConfig, family, device):
    """(teacher family, frozen teacher UNet) from model.teacher; refuses a teacher with a guidance embedding or whose
    text conditioning differs from the model's (it reads the model's prompt embeddings)."""
    from diffusion_dpo.models.families import detect_spec, family_of

    t_family = family_of(detect_spec(cfg.model.teacher))
    if t_family.has_guidance_embedding or type(t_family).text_encoder_parts != type(family).text_encoder_parts \
            or t_family.size_conditioned:
        raise ConfigError(f"model.teacher {cfg.model.teacher} is a {t_family.name} pipeline; consistency_dpo needs the "
                          f"plain diffusion model the LCM was distilled from (same text encoder as model.pretrained)")
    if not torch.allclose(t_family.load_noise_scheduler().alphas_cumprod, family.load_noise_scheduler().alphas_cumprod):
        # the teacher step uses the model's noise schedule (the code: the teacher's; equal for an LCM and its teacher)
        raise ConfigError(f"model.teacher {cfg.model.teacher} has another noise schedule than model.pretrained "
                          f"{cfg.model.pretrained}: use the model the LCM was distilled from")
    teacher = t_family.load_network(torch_dtype(cfg.model.frozen_dtype, "model.frozen_dtype"))
    return t_family, freeze(teacher).to(device)


class ConsistencyEncoder:
    """Raw batch -> ConsistencyBatch: the inner PairEncoder's PairBatch, noised at the solver step, and the frozen
    teacher's guided DDIM step."""

    def __init__(self, inner, cfg: RunConfig, family, device):
        self.inner, self.cfg, self.family, self.device = inner, cfg, family, device
        self.settings = settings(cfg)
        self.teacher_family, self.teacher = load_teacher(cfg, family, device)
        self.scheduler = family.load_noise_scheduler()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        steps, total = self.settings["solver_steps"], family.spec.num_train_timesteps
        if steps > total:
            raise ConfigError(f"loss.solver_steps must be <= the model's {total} training timesteps, got {steps}")

    @torch.no_grad()
    def __call__(self, raw: dict[str, Any]) -> Optional[ConsistencyBatch]:
        batch = self.inner(raw)
        if batch is None:
            return None
        steps, total = self.settings["solver_steps"], self.family.spec.num_train_timesteps
        index = (batch.timesteps // (total // steps)).clamp(max=steps - 1)
        start, prev = (t.repeat(2) for t in solver_timesteps(index, total, steps))
        w = draw_guidance(self.cfg.train.seed, raw["epochs"], raw["indices"], *self.settings["guidance_range"])
        w = w.to(self.device).repeat(2)
        latents = torch.cat([batch.latents_w, batch.latents_l])  # (2B, C, h, w)
        noisy = self.scheduler.add_noise(latents, batch.noise.repeat(2, 1, 1, 1), start)
        cond = batch.cond.repeat_pairs()
        empty = self.inner.empty_cond.to(self.device).prompt_embeds.expand_as(cond.prompt_embeds)
        # one teacher forward on 4B rows: prompt rows, then "" rows (the code's uncond = text encoder of "")
        both = TextConditioning(torch.cat([cond.prompt_embeds, empty]))
        out = self.teacher_family.predict(self.teacher, torch.cat([noisy, noisy]), start.repeat(2), both, None)
        a = self.scheduler.alphas_cumprod
        x_prev = guided_ddim_step(*out.float().chunk(2), noisy, w, a[start], a[prev],
                                  self.teacher_family.spec.prediction_type)
        return ConsistencyBatch(noisy, x_prev, start, prev, w + 1.0, cond, batch.pair_cond, self.settings["huber_c"])


class ConsistencyPairs:
    """Any pairs (train.batch PixelPairs or CachedPairs), encoded for consistency_dpo: the same dataset, order and
    collate; only the encoder differs."""

    labelled = False

    def __init__(self, inner):
        self.inner = inner
        self.dataset, self.collate, self.source_stats = inner.dataset, inner.collate, inner.source_stats

    def encoder(self, cfg: RunConfig, family, device) -> ConsistencyEncoder:
        if not family.has_guidance_embedding:  # before the VAE and text encoders load
            raise ConfigError(f"train.method=consistency_dpo needs a latent consistency model (a UNet with a guidance "
                              f"embedding, time_cond_proj_dim), but model.pretrained {cfg.model.pretrained} is a "
                              f"{family.name} pipeline: point it at an LCM pipeline or choose another train.method")
        return ConsistencyEncoder(self.inner.encoder(cfg, family, device), cfg, family, device)


def consistency_errors(policy, reference, family, scheduler, batch: ConsistencyBatch, reduction: str = "mean",
                       losers: bool = True, with_reference: bool = True, device=None) -> PairErrors:
    """Pseudo-Huber distances of student and reference consistency outputs at (x_s, s, w) to the target (the
    reference's consistency output at the teacher's x_{t_n}), as PairErrors. `reduction`, `losers` and
    `with_reference` are pair_errors' switches: the distance is the code's mean over C,H,W, and this method always
    needs losers and the reference (whose target every distance uses)."""
    a, kind = scheduler.alphas_cumprod, scheduler.config.prediction_type
    x, x_prev, s, tp, g = batch.noisy, batch.teacher_prev, batch.start, batch.prev, batch.guidance
    if device is not None:
        x, x_prev, s, tp, g = (v.to(device) for v in (x, x_prev, s, tp, g))
    pc = batch.pair_cond
    pc2 = None if pc is None else torch.cat([pc, pc])
    cond2 = batch.cond.repeat_pairs()  # (4B, ...): the rows at x_s, then the rows at x_{t_n}
    # one reference forward on 4B rows: its own output at x_s (d_ref) and the target at x_{t_n}
    ref = reference(lambda net: family.predict(net, torch.cat([x, x_prev]), torch.cat([s, tp]), cond2, pc2,
                                               torch.cat([g, g])), x.device)
    ref_s, ref_prev = ref.float().chunk(2)
    target = consistency_output(ref_prev, x_prev, tp, a[tp], kind)
    f_ref = consistency_output(ref_s, x, s, a[s], kind)
    f_pol = consistency_output(family.predict(policy, x, s, batch.cond, pc, g), x, s, a[s], kind)
    c = batch.huber_c
    policy_w, policy_l = split_pairs(pseudo_huber(f_pol, target, c))
    ref_w, ref_l = split_pairs(pseudo_huber(f_ref, target, c))
    return PairErrors(policy_w, policy_l, ref_w, ref_l)
