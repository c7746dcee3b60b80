"""Normalisation layers with megatron's ``(config, hidden_size, eps)`` constructor.

Sharing megatron's signature lets a ModuleSpec swap them for ``TENorm`` without an
if-branch in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Weighted RMSNorm; statistics in float32 like diffusers' ``RMSNorm`` so the two agree."""

    def __init__(self, config=None, hidden_size: int = None, eps: float = 1e-6):
        super().__init__()
        if hidden_size is None:
            raise ValueError("RMSNorm needs hidden_size")
        dtype = getattr(config, "params_dtype", torch.float32)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x.float() * torch.rsqrt(variance + self.eps)
        return (normed.to(self.weight.dtype) * self.weight).to(x.dtype)


class LayerNormNoAffine(nn.Module):
    """LayerNorm without parameters: the adaLN modulation supplies scale and shift."""

    def __init__(self, config=None, hidden_size: int = None, eps: float = 1e-6):
        super().__init__()
        if hidden_size is None:
            raise ValueError("LayerNormNoAffine needs hidden_size")
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), eps=self.eps)
