"""How APEX asks the model: one query of the model contract, and batches of queries.

The contract: ``model(x_t, t, context, context_mask=None, fake_condition=False,
t_target=None)`` -> velocity shaped like x_t; t in [0, 1], 1 = noise (a fake query flagged
by APEXConfig.fake_time_flag comes at t = tt = -t); ``fake_condition`` a
python bool or a (B,) bool tensor (the model applies its condition shift to those rows);
``t_target`` the any-step target time (None = t, a plain velocity query). Any callable with
that signature works.

Both ways of running the objective (directly, and in two phases under pipeline parallelism)
state their model queries as ModelQuery objects, so a query is written once; batching several
into one call (batch_queries) is a choice of the schedule, and it changes floating-point
results, so each schedule keeps its own batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch

from megatron_apex.models.common.condition_shift import FakeCondition


def call_model(model: Callable, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               context_mask: Optional[torch.Tensor] = None, fake_condition: FakeCondition = False,
               t_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query of the model contract; ``t_target`` is only passed when set, so velocity
    queries also work on callables written without the any-step input."""
    kwargs = dict(context_mask=context_mask, fake_condition=fake_condition)
    if t_target is not None:
        kwargs["t_target"] = t_target
    return model(x_t, t, context, **kwargs)


@dataclass
class ModelQuery:
    """One batch of model-contract inputs. ``teacher``: answered by the teacher (no-grad
    rounds only)."""

    x_t: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    context_mask: Optional[torch.Tensor] = None
    fake_condition: FakeCondition = False
    t_target: Optional[torch.Tensor] = None
    teacher: bool = False

    @property
    def rows(self) -> int:
        return self.x_t.shape[0]


def answer_query(model: Callable, query: ModelQuery) -> torch.Tensor:
    return call_model(model, query.x_t, query.t, query.context, query.context_mask,
                      fake_condition=query.fake_condition, t_target=query.t_target)


def batch_queries(queries: Iterable[ModelQuery]) -> ModelQuery:
    """The queries as one batched call: rows in order, a per-row fake_condition (a python bool
    when every query agrees), ``t_target`` = t for queries without one (tt = t is exactly a
    plain velocity query)."""
    queries = list(queries)
    if not queries:
        raise ValueError("batch_queries: no queries")
    if len(queries) == 1:
        return queries[0]
    flags = {bool(q.fake_condition) for q in queries}
    if len(flags) == 1:
        fake: FakeCondition = flags.pop()
    else:
        fake = torch.cat([torch.full((q.rows,), bool(q.fake_condition), dtype=torch.bool, device=q.x_t.device)
                          for q in queries])
    masks = [q.context_mask for q in queries]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("context_mask: either every batched query has one or none has")
    targets = None
    if any(q.t_target is not None for q in queries):
        targets = torch.cat([q.t if q.t_target is None else q.t_target.to(q.t.dtype) for q in queries])
    return ModelQuery(torch.cat([q.x_t for q in queries]), torch.cat([q.t for q in queries]),
                      torch.cat([q.context for q in queries]),
                      None if masks[0] is None else torch.cat(masks), fake, targets)


def split_output(output: torch.Tensor, queries: Iterable[ModelQuery]) -> List[torch.Tensor]:
    """Inverse of batch_queries on the batched call's output."""
    return list(torch.split(output, [q.rows for q in queries], dim=0))

