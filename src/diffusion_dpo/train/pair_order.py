"""Deterministic, resumable, process-sharded order of pairs.

Global micro-batch k of epoch e holds positions [k*G, (k+1)*G) of a permutation seeded by (seed, e),
where G = batch_size * num_processes; process r takes its slice [r*B, (r+1)*B). Resuming at any
micro-batch is arithmetic (no loader replay), and 1 process x batch 2 sees exactly the pairs that
2 processes x batch 1 see together. The last incomplete global micro-batch of an epoch is dropped.
train.curriculum's order (train/curriculum.py, CurriculumOrder) is this order over a growing pool of pairs.
"""

from __future__ import annotations

from typing import Iterator

import torch


class PairOrder:
    """The batch_sampler of the training DataLoader: which pairs each process gets in each micro-batch."""

    def __init__(self, num_pairs: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start_micro_batch: int = 0):
        self.num_pairs = num_pairs
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.seed, self.rank, self.shuffle = seed, rank, shuffle
        self.per_epoch = num_pairs // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{num_pairs} pairs cannot fill one global micro-batch of {self.global_batch} "
                             "(train.batch_size x processes): lower the batch size or add data")
        self.start = start_micro_batch

    def permutation(self, n: int, epoch: int) -> torch.Tensor:
        """The seeded shuffle of epoch `epoch` over n items (train.curriculum's pools are shuffled the same way)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(n, generator=g)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_pairs)
        return self.permutation(self.num_pairs, epoch)

    def log_fields(self, micro_batch: int) -> dict[str, int]:
        """Extra metrics.jsonl fields of the step starting at `micro_batch` (train.curriculum's level; none here)."""
        return {}

    def position(self, micro_batch: int) -> tuple[int, int]:
        """Global micro-batch counter -> (epoch, index within the epoch)."""
        return divmod(micro_batch, self.per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yields this process's micro-batches as lists of (epoch, dataset index), forever."""
        k = self.start
        while True:
            epoch, j = self.position(k)
            order = self.order(epoch)
            lo = j * self.global_batch + self.rank * self.batch_size
            yield [(epoch, int(i)) for i in order[lo: lo + self.batch_size]]
            k += 1
