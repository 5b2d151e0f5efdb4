"""Curriculum-DPO's data curriculum (Croitoru et al., arXiv 2405.13637): easy pairs first, harder ones added.

    levels = difficulty_levels(records, cfg.train.curriculum)        # level 1 (easiest) .. B of every pair
    order = CurriculumOrder(levels, cfg.train.curriculum.levels, steps_per_level * gradient_accumulation,
                            batch_size, seed, rank, world_size, start_micro_batch)

Difficulty comes from each pair's meta (the manifest's extra columns, data.sources):
    rank_difference (paper)   level k holds rank differences d in ((M-1)(B-k)/B, (M-1)(B-k+1)/B], M the pair's
                              images_per_prompt: k = B + 1 - ceil(d B / (M-1)), in integers
    score_gap (public code)   the margin column cut into B equal-width bins over [smallest, largest gap] of the
                              data, each bin open below: level k holds gaps in (g_max - k w, g_max - (k-1) w]
                              (the smallest gap falls in level B)
A large rank difference or gap is an easy pair (a clear winner), so level 1 is the largest.

The order (cumulative, as the paper): phase k (k = 1..B) lasts `phase_length` micro-batches (phase B forever)
and draws from the pool of levels 1..k. Within a phase it is PairOrder over the pool: epoch e of the phase is a
permutation of the pool seeded as PairOrder seeds epoch e, the last incomplete global micro-batch dropped; a
new phase starts a new epoch. Epochs are numbered across phases (phase k's first epoch follows phase k-1's
last), so the per-pair randomness seeded by (epoch, index) never repeats. Every position is arithmetic in the
micro-batch counter: resuming mid-level needs no replay, and processes slice one global micro-batch as
PairOrder does.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from diffusion_dpo.errors import DataError
from diffusion_dpo.train.pair_order import PairOrder

log = logging.getLogger("diffusion_dpo")

# the meta columns each difficulty reads (generate-pairs --strategy all-ranked writes all three; label and
# every generate-pairs strategy write margin)
COLUMNS = {"rank_difference": ("rank_difference", "images_per_prompt"), "score_gap": ("margin",)}


def _number(record: Any, column: str, difficulty: str, where: str) -> float:
    value = record.meta.get(column)
    try:
        return float(value)  # a CSV manifest's columns arrive as strings
    except (TypeError, ValueError):
        raise DataError(f"train.curriculum.difficulty={difficulty} needs a numeric {column!r} column for every pair; "
                        f"{where} pair {record.key} has {value!r}: make the pairs with `generate-pairs --strategy "
                        "all-ranked`, or turn train.curriculum off") from None


def difficulty_levels(records: Sequence[Any], difficulty: str, levels: int, where: str) -> list[int]:
    """The level (1 = easiest .. `levels`) of each record (data.records.PairRecord), from its meta."""
    b = levels
    if difficulty == "rank_difference":
        out = []
        for r in records:
            d, m = (_number(r, c, difficulty, where) for c in COLUMNS[difficulty])
            if d != int(d) or m != int(m) or not 1 <= d <= m - 1:
                raise DataError(f"{where} pair {r.key}: rank_difference {d:g} is not a whole number in [1, "
                                f"images_per_prompt - 1 = {m - 1:g}]; regenerate the pairs with generate-pairs")
            d, m = int(d), int(m)
            out.append(b + 1 - (-(-d * b // (m - 1))))  # ceil(d B / (M-1)) in integers: no float edge cases
        return out
    gaps = [_number(r, "margin", difficulty, where) for r in records]
    lo, hi = min(gaps, default=0.0), max(gaps, default=0.0)
    if hi == lo:  # one gap value: one level
        return [1] * len(gaps)
    # g in (hi - k w, hi - (k-1) w], w = (hi - lo) / B  <=>  k = floor((hi - g) / w) + 1; lo itself joins level B
    return [min(b, math.floor(b * (hi - g) / (hi - lo)) + 1) for g in gaps]


class CurriculumOrder(PairOrder):
    """PairOrder over the pool of active levels; the pool grows by one level every `phase_length` micro-batches."""

    def __init__(self, levels: Sequence[int], num_levels: int, phase_length: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_micro_batch: int = 0):
        super().__init__(len(levels), batch_size, seed, rank, world_size, shuffle=True,
                         start_micro_batch=start_micro_batch)
        self.num_levels, self.phase_length = num_levels, phase_length
        level = torch.tensor(list(levels), dtype=torch.long)
        # pools[k-1]: the dataset indices of levels 1..k, ascending
        self.pools = [torch.nonzero(level <= k).flatten() for k in range(1, num_levels + 1)]
        self.level_sizes = [int((level == k).sum()) for k in range(1, num_levels + 1)]
        self.epochs_per_phase = []
        for k, pool in enumerate(self.pools, start=1):
            per_epoch = len(pool) // self.global_batch
            if per_epoch == 0:
                raise DataError(f"train.curriculum: levels 1..{k} hold {len(pool)} pairs (per level: "
                                f"{self.level_sizes[:k]}), fewer than one global micro-batch of {self.global_batch} "
                                "(train.batch_size x processes): lower the batch size or train.curriculum.levels")
            self.epochs_per_phase.append(per_epoch)
        self.per_epoch = self.epochs_per_phase[0]  # micro-batches per epoch of level 1 (Trainer's first-pass check)
        # first global epoch number of each phase: a phase runs ceil(phase_length / per_epoch) epochs
        self.first_epoch = [0]
        for per_epoch in self.epochs_per_phase[:-1]:
            self.first_epoch.append(self.first_epoch[-1] + -(-phase_length // per_epoch))
        self._shown: int | None = None

    def level(self, micro_batch: int) -> int:
        """The highest active level (1..B) at a global micro-batch."""
        return min(self.num_levels, micro_batch // self.phase_length + 1)

    def position(self, micro_batch: int) -> tuple[int, int]:
        k = self.level(micro_batch)
        epoch, j = divmod(micro_batch - (k - 1) * self.phase_length, self.epochs_per_phase[k - 1])
        return self.first_epoch[k - 1] + epoch, j

    def order(self, epoch: int) -> torch.Tensor:
        k = max(i for i, first in enumerate(self.first_epoch, start=1) if first <= epoch)
        pool = self.pools[k - 1]
        return pool[self.permutation(len(pool), epoch)]

    def log_fields(self, micro_batch: int) -> dict[str, int]:
        """metrics.jsonl fields of the step starting at `micro_batch`; logs a line when the active level changes."""
        k = self.level(micro_batch)
        if k != self._shown:
            self._shown = k
            log.info("curriculum: level %d of %d active from micro-batch %d: %d pairs (levels 1..%d; per level %s)",
                     k, self.num_levels, micro_batch, len(self.pools[k - 1]), k, self.level_sizes)
        return {"curriculum_level": k, "curriculum_pairs": len(self.pools[k - 1])}


def order_pairs(cfg: Any, pairs: Any, rank: int, world_size: int, start_micro_batch: int) -> PairOrder:
    """The run's order of pairs (chosen once, in Trainer.setup): PairOrder, or CurriculumOrder under
    train.curriculum.enabled, which needs each pair's meta from a manifest."""
    t = cfg.train
    c = t.curriculum
    if not c.enabled:
        return PairOrder(len(pairs.dataset), t.batch_size, t.seed, rank, world_size,
                         start_micro_batch=start_micro_batch)
    source = getattr(pairs.dataset, "source", None)  # data.dataset.PairDataset keeps its records; a cache does not
    if pairs.labelled or source is None:
        kind = "labelled single images" if pairs.labelled else "a prepared latent cache"
        raise DataError(f"train.curriculum needs each pair's {' / '.join(COLUMNS[c.difficulty])} from a pair "
                        f"manifest; {cfg.data.source} is {kind}: point data.source to the pairs.jsonl of "
                        "generate-pairs, or turn train.curriculum off")
    levels = difficulty_levels([source[i] for i in range(len(source))], c.difficulty, c.levels, cfg.data.source)
    return CurriculumOrder(levels, c.levels, c.steps_per_level * t.gradient_accumulation, t.batch_size, t.seed,
                           rank, world_size, start_micro_batch)
