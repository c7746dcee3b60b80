"""Small models with the model contract (docs/apex_method.md), shared by the objective tests."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from megatron_apex.models.common.condition_shift import ConditionShift, apply_condition_shift


class ToyVelocityModel(nn.Module):
    """An MLP on [flatten(x_t), t, t - tt] plus a projection of the (masked) mean-pooled
    context; owns a ConditionShift that it applies when ``fake_condition`` asks for it."""

    def __init__(self, sample_shape: Tuple[int, ...] = (2, 3, 3), ctx_dim: int = 6, hidden: int = 24,
                 shift_kind: str = "scalar", a: float = -1.0, b: float = 0.0,
                 learnable: Optional[bool] = None, seed: int = 0):
        super().__init__()
        numel = 1
        for s in sample_shape:
            numel *= s
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.shift = ConditionShift(ctx_dim, shift_kind, a, b, learnable)
            self.ctx = nn.Linear(ctx_dim, hidden)
            self.inp = nn.Linear(numel + 2, hidden)
            self.out = nn.Sequential(nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, numel))

    def forward(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        c = apply_condition_shift(self.shift, context, fake_condition)
        if context_mask is None:
            pooled = c.mean(dim=1)
        else:
            m = context_mask.to(c.dtype).unsqueeze(-1)
            pooled = (c * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        tt = t if t_target is None else t_target
        h = self.inp(torch.cat([x_t.flatten(1), t[:, None].to(x_t.dtype), (t - tt)[:, None].to(x_t.dtype)], 1))
        return self.out(h + self.ctx(pooled)).view_as(x_t)


def make_batch(batch: int = 5, sample_shape: Tuple[int, ...] = (2, 3, 3), ctx_len: int = 4, ctx_dim: int = 6,
               seed: int = 0, dtype: torch.dtype = torch.float64, with_mask: bool = True):
    """(x0, noise, t, context, context_mask) with t spread over (0, 1] and t = 1 included."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((batch, *sample_shape), generator=g, dtype=dtype)
    noise = torch.randn((batch, *sample_shape), generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 0.9 + 0.05
    t[-1] = 1.0
    context = torch.randn((batch, ctx_len, ctx_dim), generator=g, dtype=dtype)
    mask = None
    if with_mask:
        mask = torch.ones(batch, ctx_len, dtype=torch.bool)
        mask[0, -1] = False
        mask[1, -2:] = False
    return x0, noise, t, context, mask
