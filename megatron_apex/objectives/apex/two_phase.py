"""APEX in two phases, the form pipeline parallelism can run.

Under pipeline parallelism a model output exists only after a whole pass through every stage,
so a query whose INPUT depends on another query's output (x_fake from F(x_t, t, c); the DM
point y from the one-step sample x_g) cannot run in the same pass. The objective is split into
rounds of no-grad queries (each round one batched forward-only pass) and then ONE training
pass that batches every query that needs a gradient. Only sg(x_fake) can cross from a no-grad
round into the training pass, hence fake_grad="detach".

The classes here only decide which of a variant's queries run in which phase; the queries and
the terms are the variant's own (paper.py, released.py), the ones its direct form runs. With
the same draws the terms equal apex_loss's up to floating-point batching.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from megatron_apex.objectives.apex import any_step, paper, released
from megatron_apex.objectives.apex.config import APEXConfig
from megatron_apex.objectives.apex.queries import ModelQuery, answer_query, batch_queries, split_output
from megatron_apex.objectives.flow import interpolate


class TwoPhaseObjective:
    """One micro-batch of an objective as rounds of no-grad queries plus one training pass.

    Protocol: for r in range(num_rounds): ``receive(r, outputs of nograd_queries(r))``; then
    ``loss(outputs of train_queries())`` -> the same dict of terms apex_loss returns."""

    num_rounds = 0

    def nograd_queries(self, round_index: int) -> List[ModelQuery]:
        raise IndexError(round_index)

    def receive(self, round_index: int, outputs: list) -> None:
        raise IndexError(round_index)

    def train_queries(self) -> List[ModelQuery]:
        raise NotImplementedError

    def loss(self, outputs: list) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class PaperTwoPhase(TwoPhaseObjective):
    """Variant "paper": round 0 = [F(x_t, t, c) (for x_fake, Eq. 11), F(x_t, t, c_fake) (v_fake,
    Eq. 14)]; training pass = [real branch (x_t, c), fake branch (x_t_fake, c_fake)]."""

    def __init__(self, x0, noise, t, context, context_mask, cfg: APEXConfig):
        if cfg.fake_grad != "detach":
            raise ValueError(f"APEXConfig.fake_grad={cfg.fake_grad!r}: the two-phase (pipeline-parallel) APEX step "
                             "cannot carry gradients through x_fake; use fake_grad='detach'")
        self.x0, self.noise, self.t, self.c, self.m, self.cfg = x0, noise, t, context, context_mask, cfg
        self.x_t = interpolate(x0, noise, t)
        self.fake_on, self.mix_on = paper.fake_branch_on(cfg), paper.v_fake_needed(cfg)
        self.num_rounds = int(self.fake_on or self.mix_on)
        self.x_fake = self.v_fake = None

    def _real(self, fake: bool) -> ModelQuery:
        return paper.real_point_query(self.x_t, self.t, self.c, self.m, fake_condition=fake)

    def nograd_queries(self, round_index):
        if round_index >= self.num_rounds:
            raise IndexError(round_index)
        return [self._real(False)] * self.fake_on + [self._real(True)] * self.mix_on

    def receive(self, round_index, outputs):
        outputs = list(outputs)
        if self.fake_on:
            self.x_fake = paper.fake_sample(outputs.pop(0), self.x_t, self.t).detach()
        if self.mix_on:
            self.v_fake = outputs.pop(0).detach()

    def train_queries(self):
        queries = [self._real(False)]
        if self.fake_on:
            queries.append(paper.fake_flow_query(self.x_fake, self.noise, self.t, self.c, self.m))
        return queries

    def loss(self, outputs):
        l_mix = paper.mix_term(outputs[0], self.v_fake, self.x0, self.x_t, self.t, self.cfg)
        l_fake = paper.fake_flow_term(outputs[1], self.x_fake, self.noise).mean() if self.fake_on else None
        return paper.paper_terms(l_fake, l_mix, self.cfg)


class ReleasedTwoPhase(TwoPhaseObjective):
    """Variant "released": round 0 = the one-step samples F(z, 1, c, tt=0) -> sg(x_g); round 1
    (DM on) = the distribution-matching queries at y (fake: model under c_fake; real: the
    teacher, or the model when there is none) -> g; under any_step, round k also runs segment k
    of the base rows' RCGM jumps (any_step.py), so there are max(those rounds, any_step_order)
    rounds; training pass = [data branch, one-step branch (its DM target sg(F_g) - g), fake
    branch]. ``teacher``: whether a teacher answers the real DM query. CFG-enhanced targets and
    the consistency term need further rounds and are not decomposed."""

    def __init__(self, x0, noise, t, context, context_mask, cfg: APEXConfig, *,
                 generator: Optional[torch.Generator] = None, teacher: bool = False, step: Optional[int] = None):
        for name, off in (("cfg_scale", 0.0), ("w_consistency", 0.0)):
            if getattr(cfg, name) != off:
                raise ValueError(f"APEXConfig.{name}={getattr(cfg, name)} is not available in the two-phase "
                                 "(pipeline-parallel) APEX step; leave it at its default")
        self.cfg, self.teacher, self.t_dtype = cfg, teacher, t.dtype
        # drawn exactly as released_apex_loss draws them: the same generator gives the same numbers
        self.b = released.released_batch(x0, noise, t, context, context_mask, cfg, generator, step)
        self.own_rounds = (1 if self.b.dm_on or self.b.fake_on else 0) + (1 if self.b.dm_on else 0)
        self.segments = None
        if self.b.tt_b is not None:
            self.segments = any_step.start_segments(self.b.x_t, self.b.t_b, self.b.tt_b, self.b.base_target,
                                                    cfg.consistency_step, cfg.any_step_order)
        self.num_rounds = max(self.own_rounds, 0 if self.segments is None else self.segments.order)
        self.x_g = self.g = None

    def _one_step(self) -> ModelQuery:
        return released.one_step_query(self.b.z_g, self.b.c_g, self.b.m_g, self.t_dtype)

    def _own_queries(self, round_index: int) -> List[ModelQuery]:
        if round_index == 0 and self.own_rounds > 0:
            return [self._one_step()]
        if round_index == 1 and self.b.dm_on:
            return released.dm_queries(self.x_g, self.b, teacher=self.teacher)
        return []

    def _runs_segment(self, round_index: int) -> bool:
        return self.segments is not None and round_index < self.segments.order

    def nograd_queries(self, round_index):
        if not 0 <= round_index < self.num_rounds:
            raise IndexError(round_index)
        queries = self._own_queries(round_index)
        if self._runs_segment(round_index):
            queries.append(any_step.segment_query(self.segments, round_index, self.b.c_b, self.b.m_b))
        return queries

    def receive(self, round_index, outputs):
        outputs = list(outputs)
        own = len(self._own_queries(round_index))
        if own and round_index == 0:
            self.x_g = (self.b.z_g - outputs[0]).detach()
        elif own:
            self.g = released.dm_direction_from_velocities(outputs[0], outputs[1], self.cfg)
        if self._runs_segment(round_index):
            any_step.advance(self.segments, round_index, outputs[own])

    def train_queries(self):
        queries = [released.base_query(self.b)]
        if self.b.dm_on:
            queries.append(self._one_step())
        if self.b.fake_on:
            queries.append(released.generated_fake_flow_query(self.x_g, self.b))
        return queries

    def loss(self, outputs):
        outputs = list(outputs)
        v_base = outputs.pop(0)
        f_g = outputs.pop(0) if self.b.dm_on else None
        v_fake = outputs.pop(0) if self.b.fake_on else None
        base_target = self.b.base_target
        if self.segments is not None:
            base_target = released.any_step_target(v_base, self.segments.displacement, base_target, self.b, self.cfg)
        return released.released_terms(self.cfg, v_base, base_target, v_fake=v_fake, x_g=self.x_g,
                                       z_fake=self.b.fresh.z_fake, f_g=f_g, g=self.g if self.b.dm_on else None,
                                       base_weight=released.base_row_weight(self.b, self.cfg))


def two_phase_apex(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   context_mask: Optional[torch.Tensor], cfg: APEXConfig, *,
                   generator: Optional[torch.Generator] = None, teacher: bool = False,
                   step: Optional[int] = None) -> TwoPhaseObjective:
    """apex_loss's arguments (``teacher`` a bool: whether one answers the real DM query) ->
    the objective of this micro-batch as a TwoPhaseObjective."""
    if not isinstance(cfg, APEXConfig):
        raise ValueError(f"two_phase_apex: cfg must be an APEXConfig, got {type(cfg).__name__}")
    if cfg.variant == "paper":
        return PaperTwoPhase(x0, noise, t, context, context_mask, cfg)
    return ReleasedTwoPhase(x0, noise, t, context, context_mask, cfg, generator=generator, teacher=teacher,
                            step=step)


def run_two_phase(model: Callable, objective: TwoPhaseObjective,
                  teacher: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """The two phases in one process (the reference the pipeline executor is tested against):
    each round's queries as one no-grad batched call per answering model, then one batched
    training call."""
    for r in range(objective.num_rounds):
        queries = objective.nograd_queries(r)
        outputs: list = [None] * len(queries)
        with torch.no_grad():
            for use_teacher in (False, True):
                idx = [i for i, q in enumerate(queries) if q.teacher == use_teacher]
                if not idx:
                    continue
                answering = teacher if use_teacher else model
                if answering is None:
                    raise ValueError("a no-grad query asks for the teacher, but no teacher was given")
                mine = [queries[i] for i in idx]
                for i, out in zip(idx, split_output(answer_query(answering, batch_queries(mine)), mine)):
                    outputs[i] = out
        objective.receive(r, outputs)
    queries = objective.train_queries()
    return objective.loss(split_output(answer_query(model, batch_queries(queries)), queries))
