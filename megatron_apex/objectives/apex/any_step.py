"""Any-step training of the released variant (APEXConfig.any_step), as the authors' release
trains its flow map.

The base rows stop being plain velocity queries F(x_t, t, c) and ask the model for a jump from t
to a target time tt <= t, in three equal groups (in this order):
  e2e  (t, tt) = (1, 0): the one-step jump from pure noise (x_t = z), paired with its data row;
  mul  tt just below t: tt = t - u * t * NEAR_DIAGONAL (a short jump; a velocity query as u -> 0);
  any  tt anywhere in [0, t]: tt = t - u * t;
with u uniform on [0, 1) drawn per row (draw_target_times); under three rows each row draws its
group (row_groups).

Each row's target is the RCGM consistency target: a jump from t to tt is a step of length d
(consistency_step) along the row's velocity target v, then the model's own jump from t - d to tt,
integrated in ``order`` equal segments (each a no-grad any-step query):
    D  = sum_k (s_k - s_{k+1}) F(x_{s_k}, s_k, c, tt=s_{k+1}),  s_0 = t - d, s_order = tt,
         x_{s_0} = x_t - d v,  x_{s_{k+1}} = x_{s_k} - (s_k - s_{k+1}) F(...)
    R  = ((t - tt) F(x_t, t, c, tt) - D) / d - v,  clamped to [-consistency_clamp, consistency_clamp]
and the loss is ||F - sg(F - R)||^2 (gradient R on F). Rows with t - tt < d are plain velocity
rows: R = F - v. The division by d keeps R from vanishing with the step: R -> the identity's
derivative as d -> 0.

The segments are written as queries (segment_query) and steps (advance) so both schedules run
them: the direct form in a loop (displacement_by_segments), the two-phase form one segment per
no-grad round (two_phase.ReleasedTwoPhase).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from megatron_apex.objectives.apex.queries import ModelQuery, answer_query
from megatron_apex.objectives.flow import draw_device, expand_time

GROUPS = ("e2e", "mul", "any")
# The release's "mul" rows jump at most this fraction of t (its min(0.05, consistc_ratio)).
NEAR_DIAGONAL = 0.05


def group_sizes(n: int) -> Tuple[int, int, int]:
    """Rows of e2e, mul, any among n base rows: round(n/3) each, the last group takes the rest."""
    first = int(round(n / 3))
    second = min(int(round(n / 3)), n - first)
    return first, second, n - first - second


def row_groups(n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Each base row's group (n,), an index into GROUPS. From three rows on: the consecutive thirds
    of group_sizes. Fewer rows (a micro-batch of 1 or 2, as large models train) could not hold
    every group, so each row draws its group uniformly from ``generator``: over a global batch the
    groups are thirds in expectation."""
    if n >= len(GROUPS):
        sizes = torch.tensor(group_sizes(n), device=device)
        return torch.repeat_interleave(torch.arange(len(GROUPS), device=device), sizes)
    return torch.randint(len(GROUPS), (n,), generator=generator, device=draw_device(generator)).to(device)


def draw_target_times(t: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(t, tt) of the base rows from their sampled times t (n,): e2e rows become (1, 0), mul and
    any rows keep t and get tt from one uniform u per row, drawn (n,) from ``generator`` on its
    device (CPU without one) in at least float32; then, for fewer than three rows, their groups
    (row_groups)."""
    n = t.shape[0]
    u = torch.rand(n, generator=generator, device=draw_device(generator),
                   dtype=torch.promote_types(t.dtype, torch.float32)).to(device=t.device, dtype=t.dtype)
    group = row_groups(n, generator, t.device)
    e2e, mul = group == GROUPS.index("e2e"), group == GROUPS.index("mul")
    near = torch.where(mul, torch.full_like(u, NEAR_DIAGONAL), torch.ones_like(u))
    tt = torch.where(e2e, torch.zeros_like(t), t - u * t * near)
    return torch.where(e2e, torch.ones_like(t), t), tt


@dataclass
class Segments:
    """The no-grad jumps of an RCGM target from s_0 = t - d (at least tt) to tt, in progress:
    ``x`` the current point, ``displacement`` the sum of the jumps so far."""

    times: List[torch.Tensor]  # s_0 ... s_order, each (n,)
    x: torch.Tensor
    displacement: torch.Tensor

    @property
    def order(self) -> int:
        return len(self.times) - 1


def start_segments(x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, velocity: torch.Tensor,
                   step: float, order: int) -> Segments:
    """Step d = ``step`` along ``velocity`` from x_t, then ``order`` equal segments from
    s_0 = max(t - d, tt) to tt (rows with t - tt <= d: zero-length segments)."""
    s0 = (t - step).clamp_min(tt)
    times = [s0 * (1 - k / order) + tt * (k / order) for k in range(order + 1)]
    x = (x_t - step * velocity).detach()
    return Segments(times, x, torch.zeros_like(x))


def segment_query(seg: Segments, k: int, context: torch.Tensor,
                  context_mask: Optional[torch.Tensor]) -> ModelQuery:
    """Segment k's any-step query F(x_{s_k}, s_k, c, tt=s_{k+1}), at the current point."""
    return ModelQuery(seg.x, seg.times[k], context, context_mask, t_target=seg.times[k + 1])


def advance(seg: Segments, k: int, jump: torch.Tensor) -> None:
    """Take segment k with the model's answer ``jump`` to its query."""
    length = expand_time(seg.times[k] - seg.times[k + 1], seg.x)
    jump = jump.detach().to(seg.x.dtype)
    seg.x = seg.x - length * jump
    seg.displacement = seg.displacement + length * jump


@torch.no_grad()
def rcgm_residual(f: torch.Tensor, displacement: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor,
                  tt: torch.Tensor, step: float, clamp: Optional[float]) -> torch.Tensor:
    """R = ((t - tt) f - D) / d - v per row (R = f - v where t - tt < d), clamped; float32 or wider."""
    dtype = torch.promote_types(f.dtype, torch.float32)
    f, displacement, velocity = f.detach().to(dtype), displacement.to(dtype), velocity.to(dtype)
    span = expand_time(t - tt, f).to(dtype)
    jump_rows = expand_time(t - tt >= step, f).bool()
    residual = torch.where(jump_rows, (span * f - displacement) / step - velocity, f - velocity)
    return residual if clamp is None else residual.clamp(-clamp, clamp)


def rcgm_target(f: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The regression target sg(f) - R: its MSE against f is mean(R^2), its gradient on f 2R/N."""
    return f.detach().to(residual.dtype) - residual


@torch.no_grad()
def displacement_by_segments(model: Callable, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor,
                             velocity: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor],
                             step: float, order: int) -> torch.Tensor:
    """D of the RCGM target, the segments run one after another (the direct form)."""
    seg = start_segments(x_t, t, tt, velocity, step, order)
    for k in range(order):
        advance(seg, k, answer_query(model, segment_query(seg, k, context, context_mask)))
    return seg.displacement
