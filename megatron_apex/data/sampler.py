"""Deterministic, resumable global-batch sampling (Megatron's random sampler, per global batch).

The sample order depends only on (seed, epoch): epoch e is `randperm(num_samples)` drawn from
a torch.Generator seeded with `seed + e`. It does not depend on the micro-batch size or the
data-parallel size, so changing either (or restarting) never changes which samples a step
sees. Resuming from `consumed_samples = k * global_batch_size` yields exactly the batches an
uninterrupted run would have seen from step k on.
"""

from __future__ import annotations

from typing import Iterator

import torch


class GlobalBatchSampler:
    """Infinite iterator over global batches (lists of dataset indices), epoch after epoch.

    `drop_last=True` drops the tail of each epoch that does not fill a global batch (the
    dropped samples change from epoch to epoch); `drop_last=False` yields it as a short
    batch. `consumed_samples` advances as batches are yielded (save it in checkpoints).
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int,
                 consumed_samples: int = 0, drop_last: bool = True):
        if global_batch_size < 1:
            raise ValueError(f"--global-batch-size must be >= 1, got {global_batch_size}")
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(f"--global-batch-size {global_batch_size} is larger than the dataset "
                             f"({num_samples} samples); lower it or use drop_last=False")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.drop_last = drop_last

    @property
    def samples_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples - self.num_samples % self.global_batch_size
        return self.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.samples_per_epoch // self.global_batch_size)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)[: self.samples_per_epoch]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch = self.epoch
            offset = self.consumed_samples - epoch * self.samples_per_epoch
            # A resume at a consumed_samples that is not a multiple of the global batch size
            # continues from the next sample, so its batches straddle the original boundaries.
            order = self.epoch_order(epoch)
            while offset < self.samples_per_epoch:
                batch = order[offset : offset + self.global_batch_size].tolist()
                offset += len(batch)
                self.consumed_samples += len(batch)
                yield batch


def micro_batch_slices(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[slice]:
    """Where this data-parallel rank's micro-batches sit in a global batch of `global_batch_size`.

    Rank r takes the contiguous slice r of the global batch and cuts it into
    G / (micro_batch_size * dp_size) micro-batches (the gradient-accumulation steps). The
    positions, not only the indices, are what the trainer needs: its per-sample random draws are
    made once for the whole global batch and sliced the same way.
    """
    g = global_batch_size
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError(f"--micro-batch-size ({micro_batch_size}) and the data-parallel size "
                         f"({dp_size}) must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
    if g % (micro_batch_size * dp_size) != 0:
        raise ValueError(f"--global-batch-size ({g}) must be divisible by --micro-batch-size "
                         f"({micro_batch_size}) x data-parallel size ({dp_size}) = "
                         f"{micro_batch_size * dp_size}")
    per_rank = g // dp_size
    first = dp_rank * per_rank
    return [slice(start, start + micro_batch_size) for start in range(first, first + per_rank, micro_batch_size)]


def micro_batches(global_indices, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This data-parallel rank's micro-batches of one global batch (the dataset indices at
    `micro_batch_slices`)."""
    indices = [int(i) for i in global_indices]
    return [indices[where] for where in micro_batch_slices(len(indices), micro_batch_size, dp_rank, dp_size)]
