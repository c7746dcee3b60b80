"""Byte sizes of planned tensors and the one rule both the checkpoint reader and the safetensors
writer use to cut an ordered list of them into bounded runs."""

from __future__ import annotations

from typing import List, Sequence

import torch


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def bounded_runs(sizes: Sequence[int], limit: int) -> List[List[int]]:
    """The indices of ``sizes``, in order, cut into runs of at most ``limit`` bytes; an item
    larger than ``limit`` is a run of its own."""
    runs: List[List[int]] = []
    total = 0
    for i, nbytes in enumerate(sizes):
        if not runs or (runs[-1] and total + nbytes > limit):
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += nbytes
    return runs
