"""Activation recompute with megatron-core's `tensor_parallel.checkpoint`: activations inside
the checkpointed piece are dropped after the forward and recomputed in the backward (with the
forward's RNG states restored), so the numbers do not change and memory goes down.

Granularities (megatron's names): "full" checkpoints every transformer layer of the model's
`layers`; "selective" only each layer's core attention (`attention.core_attention`), the
piece whose activations grow with the square of the sequence.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

GRANULARITIES = ("full", "selective")


class _Slot:
    """Where the i-th tensor argument goes back when the checkpointed call is replayed."""

    def __init__(self, index: int):
        self.index = index


def _strip(value, tensors: list):
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, (tuple, list)):
        return type(value)(_strip(v, tensors) for v in value)
    return value


def _fill(value, tensors):
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, (tuple, list)):
        return type(value)(_fill(v, tensors) for v in value)
    return value


def checkpoint_module(module: torch.nn.Module) -> None:
    """Make ``module``'s forward run under megatron's activation checkpoint whenever autograd
    records. Parameters and state-dict keys stay as they are (the forward is wrapped in place,
    so checkpoints load unchanged)."""
    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # megatron's CheckpointFunction saves only tensors: pass them through it and keep
        # everything else (None masks, enums, tuples around tensors) in the replayed call.
        tensors: list = []
        skeleton = _strip((args, kwargs), tensors)

        def replay(*replayed):
            call_args, call_kwargs = _fill(skeleton, replayed)
            return forward(*call_args, **call_kwargs)

        return tensor_parallel.checkpoint(replay, False, *tensors)

    module.forward = checkpointed_forward


def enable_activation_recompute(model: torch.nn.Module, granularity: str) -> None:
    """Checkpoint ``model.layers`` (full) or their core attention (selective)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"--recompute-granularity {granularity!r}: choose one of {GRANULARITIES}")
    for layer in model.layers:
        checkpoint_module(layer if granularity == "full" else layer.attention.core_attention)
