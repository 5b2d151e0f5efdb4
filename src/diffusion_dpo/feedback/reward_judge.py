"""The judge: one reward model, a weighted ensemble of them, or a user function, behind evaluate.rewards.

    judge = load_judge(["pickscore", "hpsv21"], weights=[1.0, 50.0], device="cuda")
    total, parts = judge.score(images, prompts)     # total (N,) = sum_i weight_i * parts[name_i]

Each member is loaded with `evaluate.rewards.load_reward` (names, name=SOURCE, or module:function);
nothing here knows a model. Ensemble scores are a plain weighted sum of RAW scores: rewards live on
different scales (PickScore about 20-23, HPS about 0.28; docs/metrics.md), so choose weights with that
in mind. Every member's own score is recorded next to the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_dpo.errors import UserError


@dataclass
class Judge:
    rewards: list[Any]  # evaluate.rewards.RewardModel
    weights: list[float]
    names: list[str]

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: reward.score(images, prompts) for name, reward in zip(self.names, self.rewards)}
        total = sum(w * parts[n] for n, w in zip(self.names, self.weights))
        return total, parts

    @property
    def info(self) -> dict:
        return {"members": [{"name": n, "weight": w, **r.info} for n, w, r in zip(self.names, self.weights, self.rewards)],
                "combination": "sum of weight * raw score" if len(self.rewards) > 1 else "single reward"}


def load_judge(specs: Sequence[str], weights: Sequence[float] | None = None, device: str = "cpu",
               dtype: str = "float32", batch_size: int | None = None) -> Judge:
    """Load every reward in `specs` (see evaluate.rewards.load_reward) with its weight (default 1 each)."""
    from diffusion_dpo.evaluate.rewards import load_reward

    if not specs:
        raise UserError("no reward given; pass --reward NAME (e.g. pickscore) or --reward module:function")
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UserError(f"--weights has {len(weights)} value(s) for {len(specs)} --reward(s); give one weight per reward")
    names = [str(s).partition("=")[0] for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--reward lists the same reward twice ({names}); give each once and set its --weights")
    rewards = [load_reward(s, device=device, dtype=dtype, batch_size=batch_size) for s in specs]
    return Judge(rewards, [float(w) for w in weights], names)
