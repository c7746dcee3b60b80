"""Folding adapters into their base weights: ``W + scale * B A`` (per TP rank, no communication)."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from megatron_apex.lora.adapters import ADAPTER_PARAMS, iter_lora_modules, merged_weight, remove_lora_
from megatron_apex.lora.apply import global_name, unwrap


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's ``state_dict()`` (its own keys) as a plain base model would have it: every
    adapted weight replaced by ``W + scale * B A``, adapter entries dropped. The model is
    unchanged. At TP=1 and one stage this is what the conversion table exports
    (``megatron_to_hf`` / ``ours_to_hf``); at TP > 1 it is this rank's shard."""
    root = unwrap(model)
    state = root.state_dict()
    for name, module in iter_lora_modules(root):
        prefix = f"{name}." if name else ""
        for key in ADAPTER_PARAMS:
            state.pop(prefix + key, None)
        state[prefix + "weight"] = merged_weight(module)
    return state


@torch.no_grad()
def merge_lora_(model: nn.Module) -> List[str]:
    """In place: fold every adapter into its weight and remove it; the model is a plain base
    model again (merged weights keep the base's ``requires_grad``). Returns the merged
    modules' global names."""
    root = unwrap(model)
    merged = []
    for name, module in list(iter_lora_modules(root)):
        module.weight.copy_(merged_weight(module))
        remove_lora_(module)
        merged.append(global_name(root, name))
    return merged
