"""The vocabulary of a family's mapping table: which of our parameters is made of which
diffusers tensors, how, and how megatron shards it. Pure data: the engine that applies a
table to tensors is megatron_apex/conversion/engine.py.

A table is a list of :class:`ParamRule`: our key pattern, the HF key pattern(s) it is made
of, how (``transform``, one of ``TRANSFORM_NAMES``), and the dimension megatron shards it
along (``tp_split_dim``, None = replicated). Patterns may contain ``{i}``, expanded over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

# Megatron's column-parallel linears shard the output rows (dim 0), row-parallel ones the
# input columns (dim 1).
COLUMN, ROW = 0, 1

# What the engine knows how to apply (conversion/engine.py TRANSFORMS):
#   copy                    the tensor as it is;
#   qkv_per_head            q, k, v fused into megatron's per-head [H * (q_h | k_h | v_h)] layout;
#   conv1x1                 a 1x1 convolution run as a linear over tokens;
#   glu_interleave          a gated layer's [x; gate] output channels interleaved, so TP chunks keep pairs;
#   conv1x1_glu_interleave  both.
TRANSFORM_NAMES = ("copy", "qkv_per_head", "conv1x1", "glu_interleave", "conv1x1_glu_interleave")


@dataclass(frozen=True)
class ParamRule:
    ours: str
    hf: Tuple[str, ...]
    transform: str = "copy"
    tp_split_dim: Optional[int] = None
    optional: bool = False  # may be absent (APEX extras that plain diffusers checkpoints lack)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ours


def linear_rules(ours: str, hf: str, tp_split_dim: Optional[int] = None, optional: bool = False,
                 bias: bool = True) -> List[ParamRule]:
    """weight (+ bias) of a linear; a row-parallel linear's bias is replicated."""
    rules = [ParamRule(f"{ours}.weight", (f"{hf}.weight",), tp_split_dim=tp_split_dim, optional=optional)]
    if bias:
        bias_dim = tp_split_dim if tp_split_dim == COLUMN else None
        rules.append(ParamRule(f"{ours}.bias", (f"{hf}.bias",), tp_split_dim=bias_dim, optional=optional))
    return rules


def shift_is_learnable(config) -> bool:
    """Whether the model has condition-shift parameters (then the table carries them)."""
    if config.shift_learnable is None:
        return config.shift_kind != "scalar"
    return bool(config.shift_learnable)
