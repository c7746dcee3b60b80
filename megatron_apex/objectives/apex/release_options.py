"""Options of the released variant that follow the authors' released training code, each off
by default (APEXConfig.fake_time_flag, .loss, .tan_weight; docs/apex_method.md has the table;
the fourth, any_step, has its own module, any_step.py):

  fake_time_flag  fake-branch queries at (t, tt) = (-t, -t) besides fake_condition
                  (flag_fake_time).
  loss            every term's per-sample loss: MSE or the pseudo-Huber loss with a detached
                  per-sample weight (per_sample_loss, pseudo_huber).
  tan_weight      the base rows' per-sample weight tan((1 - (|t| - |tt|)) * pi / 2.5) + 1
                  (tan_weight).

Both forms of the objective (released_apex_loss and the two-phase ReleasedTwoPhase) reach these
through the variant's shared queries and terms, so each option acts in both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from megatron_apex.objectives.apex.config import APEXConfig
from megatron_apex.objectives.apex.queries import ModelQuery

# The release adds this to c^2 in the weight's denominator (at c = 1e-3 it is 1 % of c^2); kept so
# the preset's gradients match the release's.
BARRON_EPS = 1e-8
TAN_SPAN = math.pi / 2.5


def flag_fake_time(query: ModelQuery, on: bool) -> ModelQuery:
    """With ``on``: the query at (t, tt) = (-t, -t), the release's flag of a fake-branch row.

    Only the time inputs change: the caller built the query's x_t with the positive time, and
    the condition shift still comes from fake_condition (our models do not read the sign). The
    target-time term emb_2(tt) * (t - tt) is zero, as for any tt = t."""
    if not on:
        return query
    return dataclasses.replace(query, t=-query.t, t_target=-query.t)


def pseudo_huber(mse: torch.Tensor, c: float) -> torch.Tensor:
    """Barron's loss with alpha = 1 on per-sample MSEs, reweighted: ``mse * sg(w) / c`` with
    ``w = (mse / (c^2 + BARRON_EPS) + 1)^(-1/2)``.

    Its gradient is the MSE's times w / c, so a sample's gradient norm is
    2 sqrt(mse / N) * w / c -> 2 sqrt((1 + BARRON_EPS / c^2) / N) once mse >> c^2: every
    sample pulls about equally, whatever its error (N = elements per sample)."""
    weight = (mse.detach() / (c * c + BARRON_EPS) + 1.0).pow(-0.5)
    return mse * weight / c


def per_sample_loss(mse: torch.Tensor, cfg: APEXConfig) -> torch.Tensor:
    """A term's per-sample loss from its per-sample MSE (B,), as APEXConfig.loss says."""
    if cfg.loss == "mse":
        return mse
    return pseudo_huber(mse, cfg.huber_c)


def tan_weight(t: torch.Tensor, t_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tan((1 - (|t| - |tt|)) * pi / 2.5) + 1`` per row (tt None = t): 1 for the one-step
    jump (t, tt) = (1, 0), tan(0.4 pi) + 1 ~ 4.078 for a velocity query (tt = t)."""
    tt = t if t_target is None else t_target
    return torch.tan((1 - (t.abs() - tt.abs())) * TAN_SPAN) + 1


def weighted_mean(per_sample: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch mean of ``per_sample`` times ``weight`` (None = unweighted)."""
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight.to(per_sample.dtype)).mean()
