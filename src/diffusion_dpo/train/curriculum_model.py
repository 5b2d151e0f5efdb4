"""Curriculum-DPO++'s model-level curriculum (arXiv 2602.13055): the LoRA rank grows at the level boundaries.

    schedule = RankSchedule.of(cfg)                 # None unless train.curriculum.rank_schedule is set
    schedule.rank_after(step)                       # the adapter's rank once `step` optimizer steps are done
    schedule.grow(unet, optimizer, rank)            # before a step that trains with a higher rank

Level k (1-based) trains with rank_schedule[k-1] (the last entry for later levels); level k starts after
(k-1) * steps_per_level optimizer steps, the boundaries of the data curriculum (train/curriculum.py), which need
not be on. The grown adapter computes the old function (models/lora.grow_lora: the same product B A, up to float32
rounding); AdamW continues: the old entries keep their moments, the new ones start from zero moments
(docs/curriculum.md, "The optimizer at a switch").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.models.lora import grow_lora

log = logging.getLogger("diffusion_dpo")


def check_config(cfg: Any) -> None:
    """RunConfig.validate's checks of train.curriculum.rank_schedule: ConfigError naming the key and the fix."""
    t, c = cfg.train, cfg.train.curriculum
    r = c.rank_schedule or [0]
    for bad, fix in ((t.finetune != "lora", "grows a LoRA adapter: remove it with train.finetune=full"),
                     (r[0] < 1 or any(b <= a for a, b in zip(r, r[1:])), "must be increasing ranks >= 1, e.g. [2, 4, 8]"),
                     (len(r) > c.levels, f"has more ranks than train.curriculum.levels={c.levels}: at most one per level"),
                     (r[-1] != cfg.lora.rank, f"ends at rank {r[-1]} but lora.rank is {cfg.lora.rank}: set lora.rank="
                                              f"{r[-1]} (the final rank) or end the schedule at {cfg.lora.rank}"),
                     (t.optimizer != "adamw", f"needs train.optimizer=adamw (its moments are grown), not {t.optimizer}"),
                     ((len(r) - 1) * c.steps_per_level >= t.max_steps,  # the saved LoRA must have lora.rank
                      f"reaches rank {r[-1]} at step {(len(r) - 1) * c.steps_per_level + 1}, after train.max_steps="
                      f"{t.max_steps}: raise train.max_steps or lower train.curriculum.steps_per_level")):
        if bad:
            raise ConfigError(f"train.curriculum.rank_schedule={c.rank_schedule} {fix}")


@dataclass(frozen=True)
class RankSchedule:
    ranks: tuple[int, ...]
    steps_per_level: int
    alpha: float  # lora.alpha (default: lora.rank): the final adapter's; alpha / rank is the scale at every rank

    @classmethod
    def of(cls, cfg: Any) -> Optional["RankSchedule"]:
        c = cfg.train.curriculum
        if c.rank_schedule is None:
            return None
        return cls(tuple(c.rank_schedule), c.steps_per_level, cfg.lora.alpha or cfg.lora.rank)

    def rank_at(self, step: int) -> int:
        """The rank that optimizer step `step` (1-based) trains with."""
        return self.ranks[min(len(self.ranks), (step - 1) // self.steps_per_level + 1) - 1]

    def rank_after(self, step: int) -> int:
        """The adapter's rank once `step` steps are done (the first rank before any)."""
        return self.rank_at(max(step, 1))

    @property
    def first_alpha(self) -> float:
        """peft's lora_alpha for the first rank: the final scale alpha / lora.rank at rank ranks[0]."""
        return self.alpha * self.ranks[0] / self.ranks[-1]

    def switch_steps(self) -> list[int]:
        """The optimizer steps that train first with a new rank."""
        return [1 + k * self.steps_per_level for k in range(1, len(self.ranks))]

    def describe(self) -> dict[str, Any]:
        """For train_summary.json and the model card."""
        return {"ranks": list(self.ranks), "first_step_of_each_rank": [1, *self.switch_steps()]}

    def grow(self, unet, optimizer, rank: int) -> list[torch.nn.Parameter]:
        """Grow `unet`'s adapters to `rank` and move `optimizer` onto the new parameters; returns the trainable
        parameters. Called between optimizer steps (gradients are None there)."""
        replaced = grow_lora(unet, rank)
        move_optimizer(optimizer, replaced)
        log.info("curriculum: LoRA rank grown to %d (%d tensors; output unchanged, new entries start at zero "
                 "optimizer moments)", rank, len(replaced))
        return [p for p in unet.parameters() if p.requires_grad]


def move_optimizer(optimizer, replaced: list[tuple[torch.nn.Parameter, torch.nn.Parameter]]) -> None:
    """Point `optimizer` (torch AdamW, or accelerate's wrapper of it) at the new parameters. Each tensor's moments
    (exp_avg, exp_avg_sq) go into the leading block of zero tensors of the new shape, so the old entries continue
    exactly and the new ones start from zero moments; the step count is per tensor in torch's AdamW and is kept."""
    inner = getattr(optimizer, "optimizer", optimizer)
    new_of = {id(old): new for old, new in replaced}
    for group in inner.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]
    for old, new in replaced:
        state = inner.state.pop(old, None)
        if not state:
            continue
        if set(state) - {"step", "exp_avg", "exp_avg_sq"}:  # amsgrad's max_exp_avg_sq, another optimizer's state
            raise ConfigError(f"train.curriculum.rank_schedule: optimizer state {sorted(state)} cannot be grown; "
                              "use train.optimizer=adamw")
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state[key]
            grown = torch.zeros_like(new, dtype=moment.dtype, device=moment.device)
            grown[tuple(slice(0, n) for n in moment.shape)] = moment
            state[key] = grown
        inner.state[new] = state
