"""Seeding: python, numpy, torch and megatron's model-parallel RNG tracker in one call."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_apex.parallel.cpu_adaptation import apply_cpu_adaptations

# megatron's own training seeds each pipeline stage differently so that stages do not build
# identical layers; the same offset is used here.
PIPELINE_SEED_STRIDE = 100


def set_seed(seed: int, *, offset_by_pipeline_rank: bool = True) -> int:
    """Seed every generator the model code can draw from; returns the seed actually used.

    With ``use_cpu_initialization=True`` megatron builds each full weight from the CPU
    generator and keeps this rank's slice, so a model built after ``set_seed(s)`` is the same
    for every tensor-parallel size. The tensor-parallel tracker (``get_cuda_rng_tracker()``)
    gets seeds that differ per TP rank, as in megatron. On CPU it tracks the CPU generator
    (see cpu_adaptation.cpu_rng); parallel_state need not be initialised (ranks count as 0).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    apply_cpu_adaptations()
    initialised = ps.model_parallel_is_initialized()
    if initialised and offset_by_pipeline_rank:
        seed = seed + PIPELINE_SEED_STRIDE * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    ranks = {} if initialised else {"tp_rank": 0, "ep_rank": 0, "etp_rank": 0}
    tensor_parallel.model_parallel_cuda_manual_seed(seed, **ranks)
    return seed
