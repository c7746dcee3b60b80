"""``--lora-fake-reference base``: the objective's no-grad queries under the shifted condition
(the paper's v_fake, Eq. 14; the released variant's distribution-matching fake velocity) are
answered by the frozen base model (adapters off) instead of the adapted one.

The objective code stays as it is: these wrappers route queries around it.
- Direct step: :class:`BaseFakeReference` is the model-contract callable handed to
  ``apex_loss``. A query made without grad whose rows carry ``fake_condition`` goes to the
  base; every other query (all queries with a gradient) to the adapted model. A batched query
  mixing fake and real rows is split by row.
- Two-phase step (pipeline parallelism): :func:`route_fake_queries_to_base` marks the
  objective's fake-condition no-grad queries as teacher queries, and :class:`BaseModel`
  (the adapted model with adapters off) answers them in the teacher's slot of the pass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from megatron_apex.lora.adapters import adapters_disabled

FAKE_REFERENCES = ("adapted", "base")


def _call(model, x_t, t, context, context_mask, fake_condition, t_target):
    kwargs = dict(context_mask=context_mask, fake_condition=fake_condition)
    if t_target is not None:
        kwargs["t_target"] = t_target
    return model(x_t, t, context, **kwargs)


def _rows(x: Optional[torch.Tensor], index: torch.Tensor) -> Optional[torch.Tensor]:
    return None if x is None else x[index]


class BaseModel:
    """The base of an adapted model as a model-contract callable (adapters off for the call).
    ``module`` is the wrapped model, so pipeline code that unwraps ``.module`` reaches the
    stage model (to set its input tensor)."""

    def __init__(self, model: nn.Module):
        self.module = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.module):
            return self.module(*args, **kwargs)


class BaseFakeReference:
    """Model-contract callable for ``apex_loss``: no-grad fake-condition rows -> the base,
    everything else -> the adapted model."""

    def __init__(self, model: nn.Module):
        self.module = model
        self.base = BaseModel(model)

    def __call__(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        args = (x_t, t, context, context_mask)
        if torch.is_grad_enabled():
            return _call(self.module, *args, fake_condition, t_target)
        if not isinstance(fake_condition, torch.Tensor) or fake_condition.dim() == 0:
            target = self.base if bool(fake_condition) else self.module
            return _call(target, *args, fake_condition, t_target)
        fake = fake_condition.to(torch.bool)
        if bool(fake.all()):
            return _call(self.base, *args, True, t_target)
        if not bool(fake.any()):
            return _call(self.module, *args, False, t_target)
        out = None
        for rows, target in ((fake.nonzero().squeeze(1), self.base), ((~fake).nonzero().squeeze(1), self.module)):
            part = _call(target, x_t[rows], t[rows], context[rows], _rows(context_mask, rows), bool(target is self.base),
                         _rows(t_target, rows))
            if out is None:
                out = part.new_empty((x_t.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


class _FakeToBase:
    """A TwoPhaseObjective whose fake-condition no-grad queries are answered by the teacher
    slot of the pass (there: :class:`BaseModel`)."""

    def __init__(self, objective):
        self.objective = objective

    @property
    def num_rounds(self) -> int:
        return self.objective.num_rounds

    def receive(self, round_index: int, outputs: list) -> None:
        self.objective.receive(round_index, outputs)

    def train_queries(self) -> list:
        return self.objective.train_queries()

    def loss(self, outputs: list):
        return self.objective.loss(outputs)

    def nograd_queries(self, round_index: int) -> list:
        queries = self.objective.nograd_queries(round_index)
        out = []
        for q in queries:
            if isinstance(q.fake_condition, torch.Tensor):
                raise ValueError("--lora-fake-reference base: a no-grad query mixes fake and real rows; it cannot be "
                                 "routed to the base in the two-phase step")
            if q.fake_condition:
                if q.teacher:
                    raise ValueError("--lora-fake-reference base: a fake-condition query already goes to the teacher")
                q = replace(q, teacher=True)
            elif q.teacher:
                raise ValueError("--lora-fake-reference base cannot run with a frozen teacher in the two-phase step "
                                 "(pipeline parallelism or --apex-schedule two-phase): the teacher's slot answers the "
                                 "base's queries; use --teacher online or the direct schedule")
            out.append(q)
        return out


def route_fake_queries_to_base(objective):
    """``objective`` (a TwoPhaseObjective) with its fake-condition no-grad queries marked as
    teacher queries; run it with ``teacher=BaseModel(model)``."""
    return _FakeToBase(objective)
