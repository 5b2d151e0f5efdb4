"""Latent consistency distillation (LCD, arXiv 2310.04378) of the demo base into a miniature latent consistency model.

    python -m diffusion_dpo.demo.distill_lcm --out DIR [--steps N] [--threads T]
    diffusion-dpo demo --distill-lcm --output-dir OUT          # distils into OUT/lcm, then evaluates it

As diffusers' train_lcm_distill_sd_wds.py does it, at the demo's scale; the maths is models.consistency's (the
functions Consistency-DPO uses), so the two cannot drift apart:

    student  = the teacher's UNet + a guidance embedding (time_cond_proj_dim), initialised from the teacher; its
               cond_proj starts at zero, so at step 0 the student *is* the teacher's conditional network
    target   = an EMA copy of the student (decay 0.95), never trained
    per row  : solver index n ~ U{0..steps-1}, s = (n+1)k - 1, t = max(s - k, 0) (models.consistency.solver_timesteps),
               w ~ U[w_min, w_max] (the teacher's guidance w: the pipeline's scale w + 1), noise eps,
               x_s     = sqrt(a_s) x0 + sqrt(1 - a_s) eps
               x_t     = one guided DDIM step of the frozen teacher (prompt and "" rows)        (guided_ddim_step)
               loss    = pseudo-Huber(f_student(x_s, s, w), f_target(x_t, t, w))  (or L2)     (consistency_output)
    f(x, t) = c_skip(t) x + c_out(t) x0_hat: the boundary scalings of LCMScheduler (timestep scaling 10).

Data: x0 are VAE latents of the demo world's own training images (world.sample_dataset on the train captions: the
distribution the base was pretrained on; the diffusers script, too, noises real latents), encoded once with the
base's VAE (a posterior sample per image, times the scaling factor, as the script). Prompts: those images'
captions; the unconditional rows use the text encoder of "" (what the base's 10% caption dropout trained on).

Output: a LatentConsistencyModelPipeline folder (the base's VAE, text encoder and tokenizer, the EMA target UNet,
an LCMScheduler from the base's scheduler config with original_inference_steps = the solver steps) that
models.families detects as `lcm` and stock diffusers loads; distill.json beside it holds the settings, the
seconds and the loss curve; <out>.distill.log the log.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from diffusion_dpo.models.consistency import consistency_output, guided_ddim_step, pseudo_huber, solver_timesteps
from diffusion_dpo.models.encode import guidance_embedding


@dataclass
class DistillSettings:
    out: str = "demo_lcm"
    base: Optional[str] = None
    """Teacher pipeline folder (None: the shipped demo base)."""
    seed: int = 0
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup: int = 50
    solver_steps: int = 50
    """DDIM solver steps over the 1000 training timesteps (skip k = 20, as LCM and Curriculum-DPO)."""
    w_min: float = 1.0
    w_max: float = 4.0
    """The teacher's guidance w ~ U[w_min, w_max] (pipeline scale w + 1: 2..5 around the demo's 3)."""
    ema_decay: float = 0.95
    loss: str = "huber"
    """huber (pseudo-Huber, c = huber_c, the LCM paper's and Curriculum-DPO's) or l2 (the diffusers default)."""
    huber_c: float = 0.001
    cond_dim: int = 64
    """time_cond_proj_dim of the student's guidance embedding."""
    num_images: int = 4096
    threads: int = 2
    log_every: int = 50
    save_every: int = 0
    """Also save the pipeline every N steps into <out>-step<N> (0: only at the end), to measure quality vs steps."""

    def __post_init__(self) -> None:
        from diffusion_dpo.errors import ConfigError

        if self.loss not in ("huber", "l2"):
            raise ConfigError(f"--loss {self.loss!r}: choose huber or l2")
        if not 0 <= self.w_min <= self.w_max:
            raise ConfigError(f"guidance range [{self.w_min}, {self.w_max}] must satisfy 0 <= w_min <= w_max")
        if self.steps < 1 or self.batch_size < 1 or not 1 <= self.solver_steps <= 1000:
            raise ConfigError("--steps and --batch-size must be >= 1, --solver-steps in [1, 1000]")


def student_from_teacher(teacher, cond_dim: int):
    """The teacher's UNet with a guidance embedding: same config plus time_cond_proj_dim, the teacher's weights, and
    cond_proj (the only new weight) at zero, so the student starts as the teacher's conditional network for every w."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": cond_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


@torch.no_grad()
def world_latents(vae, num_images: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Scaled VAE latents (N, 4, h, w) of `num_images` world renders on the train captions, and their captions."""
    import numpy as np

    from diffusion_dpo.demo.world import sample_dataset

    data = sample_dataset(num_images, seed=seed)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in data])).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.sample(generator=g)
                         for i in range(0, len(pixels), 256)])
    return latents * vae.config.scaling_factor, [c for _, c, _ in data]


class Distiller:
    """Teacher, student, EMA target and the noise schedule; `loss(x0, cond, empty, generator)` is one LCD loss."""

    def __init__(self, teacher, noise_scheduler, s: DistillSettings):
        self.s = s
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student_from_teacher(teacher, s.cond_dim).train()
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.alphas = noise_scheduler.alphas_cumprod.float()
        self.total = len(self.alphas)
        self.kind = noise_scheduler.config.prediction_type

    def consistency(self, net, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """f(x, t) of a guidance-embedded UNet at the teacher's w (embedded as the pipeline's scale w + 1)."""
        emb = guidance_embedding(w + 1.0, net.config.time_cond_proj_dim)
        pred = net(x, t, encoder_hidden_states=cond, timestep_cond=emb).sample
        return consistency_output(pred, x, t, self.alphas[t], self.kind)

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, empty: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """x0 (B, C, h, w) scaled latents, cond (B, L, D) their prompt embeddings, empty (1, L, D) the "" embedding."""
        n = x0.shape[0]
        index = torch.randint(0, self.s.solver_steps, (n,), generator=g)
        start, prev = solver_timesteps(index, self.total, self.s.solver_steps)
        w = self.s.w_min + (self.s.w_max - self.s.w_min) * torch.rand((n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = self.alphas[start].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = self.consistency(self.student, noisy, start, w, cond)
        with torch.no_grad():
            # one teacher forward on 2B rows: prompt rows, then "" rows
            out = self.teacher(torch.cat([noisy, noisy]), start.repeat(2),
                               encoder_hidden_states=torch.cat([cond, empty.expand_as(cond)])).sample
            x_prev = guided_ddim_step(*out.chunk(2), noisy, w, self.alphas[start], self.alphas[prev], self.kind)
            target = self.consistency(self.target, x_prev, prev, w, cond)
        if self.s.loss == "l2":
            return (pred - target).pow(2).flatten(1).mean(1).mean()
        return pseudo_huber(pred, target, self.s.huber_c).mean()

    @torch.no_grad()
    def update_target(self) -> None:
        for pt, p in zip(self.target.parameters(), self.student.parameters()):
            pt.lerp_(p, 1 - self.s.ema_decay)


def save_lcm_pipeline(base_pipe, unet, out: str | Path, solver_steps: int) -> Path:
    """A LatentConsistencyModelPipeline folder: the base's VAE / text encoder / tokenizer with `unet` (float32)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler.from_config(base_pipe.scheduler.config, original_inference_steps=solver_steps)
    pipe = LatentConsistencyModelPipeline(vae=base_pipe.vae, text_encoder=base_pipe.text_encoder,
                                          tokenizer=base_pipe.tokenizer, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))  # linear warm-up, then constant (as the diffusers script)


def _file_logger(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.distill.log"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def distill(s: DistillSettings, log=None) -> Path:
    """Distil the base (s.base, default the shipped demo base) into s.out; returns the folder. `log`: a callable
    taking one line (default: print and append to <out>.distill.log)."""
    from diffusion_dpo.demo.base import load_pipeline
    from diffusion_dpo.models.families.sd import SDFamily

    torch.set_num_threads(s.threads)
    start_time = time.time()
    log = log or _file_logger(Path(s.out))
    torch.manual_seed(s.seed)
    base = load_pipeline(s.base)
    latents, captions = world_latents(base.vae, s.num_images, s.seed)
    texts = sorted(set(captions))
    encoders = SDFamily.pipeline_text_encoders(base)
    with torch.no_grad():
        table = SDFamily.encode_prompts(encoders, texts + [""], "cpu").prompt_embeds  # (U + 1, L, D)
    cap_index = torch.tensor([texts.index(c) for c in captions])
    d = Distiller(base.unet, base.scheduler, s)
    opt = torch.optim.AdamW(d.student.parameters(), lr=s.learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed + 1)
    curve: list[float] = []

    def save(folder: str) -> Path:
        out = save_lcm_pipeline(base, d.target, folder, s.solver_steps)
        seconds = round(time.time() - start_time, 1)
        (out / "distill.json").write_text(json.dumps({"settings": asdict(s), "seconds": seconds, "loss": curve}))
        log(f"saved {out} after {len(curve)} steps ({seconds:.0f}s)")
        return out

    log(f"distilling {sum(p.numel() for p in d.student.parameters()) / 1e6:.2f}M-parameter UNet on "
        f"{len(latents)} world latents ({len(texts)} captions), {s.steps} steps x {s.batch_size}")
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = s.learning_rate * _lr_factor(step, s.warmup)
        rows = torch.randint(len(latents), (s.batch_size,), generator=g)
        loss = d.loss(latents[rows], table[cap_index[rows]], table[-1:], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(d.student.parameters(), 1.0)
        opt.step()
        d.update_target()
        curve.append(round(loss.item(), 6))
        if step % s.log_every == 0 or step == s.steps - 1:
            recent = curve[-s.log_every:]
            log(f"step {step + 1}/{s.steps} loss {sum(recent) / len(recent):.5f} ({time.time() - start_time:.0f}s)")
        if s.save_every and (step + 1) % s.save_every == 0 and step + 1 < s.steps:
            save(f"{s.out}-step{step + 1}")
    return save(s.out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output LatentConsistencyModelPipeline folder")
    p.add_argument("--base", default=None, help="teacher pipeline folder (default: the shipped demo base)")
    for name in ("seed", "steps", "batch_size", "learning_rate", "solver_steps", "w_min", "w_max", "ema_decay",
                 "loss", "huber_c", "cond_dim", "num_images", "threads", "save_every"):
        default = getattr(DistillSettings, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    a = vars(p.parse_args(argv))
    distill(DistillSettings(**a))


if __name__ == "__main__":
    main()
