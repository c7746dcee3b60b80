"""Sequence parallelism (Megatron-LM's ``--sequence-parallel``) for the DiT blocks.

With tensor parallelism (TP) every rank holds whole activations between the tensor-parallel
linears; under sequence parallelism (SP) each rank holds 1/TP of the tokens there instead:
megatron-core's ``ColumnParallelLinear`` all-gathers its input along the sequence and
``RowParallelLinear`` reduce-scatters its output back, so attention and the MLP see every token
(heads / channels split over TP as before) while norms, modulation and residuals run on this
rank's share. What stays replicated is decided here:

- linears whose input is the same on every TP rank (the adaLN modulation of the per-sample
  time embedding, a caption) must not gather it: they are built with
  :func:`replicated_input_config`, the TransformerConfig without SP;
- a per-sample vector applied to this rank's tokens only (the modulation) gets only this rank's
  share of its gradient: :func:`to_sequence_shards` sums it over TP in the backward;
- replicated weights applied to this rank's tokens (row-parallel biases, which megatron marks
  itself, and the output projection) carry ``sequence_parallel = True``, which megatron's
  ``finalize_model_grads`` reads to all-reduce their gradients over TP (:func:`mark_sequence_parallel`).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
                                           scatter_to_sequence_parallel_region)

FLAG = "--sequence-parallel"
TP_FLAG = "--tensor-model-parallel-size"


def check_sequence_parallel(model_config, tensor_model_parallel_size: int, *, lora: bool = False) -> None:
    """Refuse, in one line naming the flags, what sequence parallelism cannot run with."""
    if tensor_model_parallel_size < 2:
        raise ValueError(f"{FLAG} needs {TP_FLAG} > 1 (it splits the sequence over the tensor-parallel ranks), "
                         f"got {TP_FLAG} {tensor_model_parallel_size}")
    unsupported = model_config.SEQUENCE_PARALLEL_UNSUPPORTED
    if unsupported:
        raise ValueError(f"{FLAG} is not supported for {unsupported}; drop {FLAG}")
    if lora:
        raise ValueError(f"{FLAG} cannot run with --lora-rank yet: the LoRA adapters do not gather / "
                         f"reduce-scatter the sequence; drop {FLAG} or train without LoRA")


def padded_length(length: int, tp: int) -> int:
    """``length`` rounded up to a multiple of ``tp``."""
    return -(-length // tp) * tp


def check_image_tokens(num_image: int, grid_h: int, grid_w: int, tp: int) -> None:
    if num_image % tp:
        raise ValueError(f"{FLAG} splits the image tokens over {TP_FLAG} ({tp}) ranks: {num_image} image tokens "
                         f"(a {grid_h}x{grid_w} patch grid) are not divisible by {tp}; use an image size whose "
                         f"patch grid has a multiple of {tp} tokens, or drop {FLAG}")


def replicated_input_config(config):
    """``config`` for a tensor-parallel linear whose input is replicated over TP (not split
    along the sequence): the same TransformerConfig without sequence parallelism, built once
    per config."""
    if not config.sequence_parallel:
        return config
    cached = config.__dict__.get("_replicated_input_config")
    if cached is None:
        cached = dataclasses.replace(config, sequence_parallel=False)
        config.__dict__["_replicated_input_config"] = cached
    return cached


def to_sequence_shards(x: torch.Tensor, config, tp_group=None) -> torch.Tensor:
    """``x`` (replicated over TP) as it enters computations on this rank's share of the
    tokens: identity forward, gradient summed over TP backward (each rank sees its tokens'
    share only). No-op without SP."""
    if not config.sequence_parallel:
        return x
    return copy_to_tensor_model_parallel_region(x, group=tp_group)


def mark_sequence_parallel(module: torch.nn.Module) -> None:
    """Replicated parameters applied to sequence shards: their TP-partial gradients are summed
    by megatron's finalize_model_grads (it reads this attribute when config.sequence_parallel)."""
    for param in module.parameters():
        param.sequence_parallel = True


def scatter_sequence(x: torch.Tensor, tp_group=None) -> torch.Tensor:
    """[s, b, h] replicated -> this rank's [s / TP, b, h] (backward: all-gather)."""
    return scatter_to_sequence_parallel_region(x, group=tp_group)


def gather_sequence(x: torch.Tensor, tp_group=None) -> torch.Tensor:
    """This rank's [s / TP, b, h] -> the whole [s, b, h] on every rank. Its consumer is
    replicated (the loss is computed alike on every TP rank), so the backward keeps this
    rank's slice of the gradient instead of reduce-scattering TP identical copies."""
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=tp_group)
