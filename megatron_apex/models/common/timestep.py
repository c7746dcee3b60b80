"""Sinusoidal timestep features and the MLP that embeds them.

Convention of Qwen-Image (diffusers ``Timesteps(256, flip_sin_to_cos=True,
downscale_freq_shift=0, scale=1000)``): ``t`` in [0, 1] is multiplied by 1000 inside,
the features are ordered ``[cos | sin]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_timestep_features(
    t: torch.Tensor,
    num_channels: int = 256,
    scale: float = 1000.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """(B,) -> (B, num_channels) float32 features ``[cos(s*t*f) | sin(s*t*f)]``.

    Always float32: in bf16 the time itself would be rounded to 8 mantissa bits
    (diffusers casts ``t`` to the model dtype first; in float32 both agree).
    """
    if t.dim() != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = num_channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    angles = scale * angles
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if num_channels % 2:
        features = F.pad(features, (0, 1))
    return features


class TimestepEmbedder(nn.Module):
    """``linear_2(SiLU(linear_1(features(t))))`` — diffusers' ``TimestepEmbedding``.

    Replicated (not tensor-parallel): it is small and its input is the same on every rank.
    """

    def __init__(self, hidden_size: int, num_channels: int = 256, scale: float = 1000.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_channels = num_channels
        self.scale = scale
        self.linear_1 = nn.Linear(num_channels, hidden_size, dtype=dtype)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, dtype=dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_features(t, self.num_channels, self.scale)
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))
