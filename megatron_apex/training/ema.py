"""Frozen copies of the model (the EMA of the weights kept for sampling, the frozen teacher of
the released APEX variant). They are built as models of their own, sharded like the model, so
they checkpoint and reshard exactly like it (a deepcopy cannot copy megatron's process groups)."""

from typing import Callable

import torch


def frozen_copy(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    clone = build()
    clone.load_state_dict(model.state_dict())
    clone.requires_grad_(False)
    clone.eval()
    return clone


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)
