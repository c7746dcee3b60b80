"""The two-phase training step: how APEX runs under pipeline parallelism (and, to test it,
without).

A global batch runs as
  1. forward-only pipeline passes, one per round of the objective's no-grad queries
     (`paper`: x_fake and v_fake; `released`: the one-step samples, then the
     distribution-matching queries), each with every micro-batch's queries batched into one
     model call; the last stage's outputs are broadcast over the pipeline group, so every
     stage builds the next round's inputs (and the losses' targets) itself;
  2. one training pass through megatron-core's schedule (1F1B with PP > 1) whose micro-batch
     is every query that needs a gradient, batched (`paper`: [real branch, fake branch];
     `released`: [data branch, one-step branch, fake branch]); the loss is computed on the
     last stage from the batched output and the precomputed no-grad tensors.
Every model forward of both phases runs inside ``forward_context()`` (the trainer's FP8
autocast, as the direct step's forward; backward passes stay outside it). The decomposition
itself is megatron_apex.objectives.apex.two_phase. Between stages the
model's one [L + N + 1, rows, D] tensor carries both streams and the time embedding; a
no-grad pass that also asks the frozen teacher carries the teacher's rows behind the
model's in the same tensor.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, ContextManager, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_apex.families import build_model
from megatron_apex.objectives.apex import (ModelQuery, TwoPhaseObjective, answer_query, batch_queries,
                                           split_output)
from megatron_apex.objectives.flow import flow_matching_error, interpolate


# ---------------------------------------------------------------------------------------------
# Stage models

def build_stage_model(config, spec=None, sequence_parallel: bool = False):
    """This rank's pipeline stage: the input embeddings on the first, the output head on the
    last, megatron's even split of the layers in between."""
    return build_model(config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                       spec=spec, sequence_parallel=sequence_parallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------
# Flow matching as a (single-phase) objective, for the iterations before --apex-start-iter

class FlowMatchingObjective(TwoPhaseObjective):
    """Plain flow matching (megatron_apex.objectives.fm.fm_loss) as one training query."""

    def __init__(self, x0, noise, t, context, context_mask):
        self.query = ModelQuery(interpolate(x0, noise, t), t, context, context_mask)
        self.x0, self.noise = x0, noise

    def train_queries(self):
        return [self.query]

    def loss(self, outputs):
        l_fm = flow_matching_error(outputs[0], self.x0, self.noise).mean()
        return {"loss": l_fm, "l_fm": l_fm}


# ---------------------------------------------------------------------------------------------
# The passes

def _pass_shape(model, per_micro_batch: List[List[ModelQuery]]) -> tuple:
    """(seq_length, rows) of the tensor between stages: every micro-batch's queries batched
    into one call, the same shape for every micro-batch of a pass (megatron's schedule sends
    one fixed shape)."""
    stage = unwrap(model)
    # under sequence parallelism megatron's schedule divides the sequence length it is given by
    # TP to get what each rank sends: give it TP times this rank's share
    sp = stage.config.tensor_model_parallel_size if stage.config.sequence_parallel else 1
    shapes = set()
    for queries in per_micro_batch:
        _, _, height, width = queries[0].x_t.shape
        seq, rows, _ = stage.stage_tensor_shape(sum(q.rows for q in queries), queries[0].context.shape[1],
                                                height, width)
        shapes.add((seq * sp, rows))
    if len(shapes) != 1:
        raise ValueError(f"every micro-batch of a pipeline pass must have the same shape, got {sorted(shapes)}")
    return shapes.pop()


def _pipeline_broadcast(outputs: Optional[List[torch.Tensor]], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The last stage's per-micro-batch outputs, stacked, on every stage of the pipeline."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return torch.stack(outputs)
    if ps.is_pipeline_last_stage():
        stacked = torch.stack(outputs).contiguous()
    else:
        stacked = torch.empty(shape, dtype=dtype)
    dist.broadcast(stacked, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return stacked


def _collect(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
    return output.detach()


def _split_by_model(queries: List[ModelQuery]) -> tuple:
    model_idx = [i for i, q in enumerate(queries) if not q.teacher]
    teacher_idx = [i for i, q in enumerate(queries) if q.teacher]
    return model_idx, teacher_idx


ForwardContext = Callable[[], ContextManager]


@torch.no_grad()
def nograd_pass(model, teacher, per_micro_batch: List[List[ModelQuery]], schedule: Callable,
                forward_context: ForwardContext = contextlib.nullcontext) -> List[List[torch.Tensor]]:
    """One forward-only pipeline pass: micro-batch i answers the queries per_micro_batch[i]
    (the model's rows first, then the teacher's, in one stage tensor), both inside one
    ``forward_context()``. Returns the answers, in query order, on every pipeline stage."""
    model_idx, teacher_idx = _split_by_model(per_micro_batch[0])
    if teacher_idx and teacher is None:
        raise ValueError("a no-grad query asks for the teacher, but there is none")
    parts = []
    for queries in per_micro_batch:
        if _split_by_model(queries) != (model_idx, teacher_idx):
            raise ValueError("every micro-batch of a pipeline pass must ask the same queries")
        parts.append([batch_queries([queries[i] for i in idx]) if idx else None for idx in (model_idx, teacher_idx)])
    seq, rows = _pass_shape(model, per_micro_batch)

    def forward_step(data_iterator, ddp_model):
        pair = next(data_iterator)
        stage = unwrap(ddp_model)
        stage_input = stage.input_tensor
        outs, offset = [], 0
        with forward_context():
            for module, query in zip((ddp_model, teacher), pair):
                if query is None:
                    continue
                if stage_input is not None:  # this stage's rows of the previous stage's tensor
                    unwrap(module).set_input_tensor(stage_input[:, offset:offset + query.rows])
                outs.append(answer_query(module, query))
                offset += query.rows
        batch_dim = 0 if stage.post_process else 1  # velocity (B, C, H, W) vs stage tensor [S, B, D]
        return torch.cat(outs, dim=batch_dim), _collect

    collected = schedule(forward_step_func=forward_step, data_iterator=iter(parts), model=[model],
                         num_microbatches=len(parts), seq_length=seq, micro_batch_size=rows, forward_only=True,
                         collect_non_loss_data=True)
    first = per_micro_batch[0][0].x_t
    outputs = _pipeline_broadcast(collected if ps.is_pipeline_last_stage() else None,
                                  (len(parts), rows, *first.shape[1:]), first.dtype)
    answers = []
    for queries, out in zip(per_micro_batch, outputs):
        ordered = [q for idx in (model_idx, teacher_idx) for q in (queries[i] for i in idx)]
        pieces = dict(zip(model_idx + teacher_idx, split_output(out, ordered)))
        answers.append([pieces[i] for i in range(len(queries))])
    return answers


def terms_report(terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What a training forward step reports for the logs."""
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return {k: v.detach().float().clone() for k, v in terms.items()}


def _training_loss(objective: TwoPhaseObjective, queries: List[ModelQuery], output: torch.Tensor):
    terms = objective.loss(split_output(output, queries))
    return terms["loss"], terms_report(terms)


def training_pass(model, objectives: List[TwoPhaseObjective], schedule: Callable,
                  forward_context: ForwardContext = contextlib.nullcontext) -> List[Dict[str, torch.Tensor]]:
    """The forward/backward pass of every query that needs a gradient (one batched model call
    per micro-batch, inside ``forward_context()``; the schedule runs the backward outside
    it); returns the per-micro-batch terms on the last stage."""
    items = [(objective, objective.train_queries()) for objective in objectives]
    seq, rows = _pass_shape(model, [queries for _, queries in items])
    batched = [batch_queries(queries) for _, queries in items]

    def forward_step(data_iterator, ddp_model):
        (objective, queries), query = next(data_iterator)
        with forward_context():
            output = answer_query(ddp_model, query)
        return output, partial(_training_loss, objective, queries)

    return schedule(forward_step_func=forward_step, data_iterator=iter(list(zip(items, batched))), model=[model],
                    num_microbatches=len(items), seq_length=seq, micro_batch_size=rows, forward_only=False)


def two_phase_step(model, objectives: List[TwoPhaseObjective], teacher=None,
                   forward_context: ForwardContext = contextlib.nullcontext) -> List[Dict[str, torch.Tensor]]:
    """One global batch (this data-parallel rank's micro-batches): the no-grad rounds, then the
    training pass. ``model`` is the DDP-wrapped stage model; gradients land in its buffers.
    ``forward_context`` makes the context every model (and teacher) forward runs in: the
    trainer's FP8 autocast, entered per micro-batch of every pass as the direct step does."""
    schedule = get_forward_backward_func()
    rounds = {objective.num_rounds for objective in objectives}
    if len(rounds) != 1:
        raise ValueError(f"the micro-batches of one step need different numbers of no-grad rounds: {sorted(rounds)}")
    for r in range(rounds.pop()):
        answers = nograd_pass(model, teacher, [objective.nograd_queries(r) for objective in objectives], schedule,
                              forward_context)
        for objective, outputs in zip(objectives, answers):
            objective.receive(r, outputs)
    return training_pass(model, objectives, schedule, forward_context)


@torch.no_grad()
def pipeline_forward(model, query: ModelQuery) -> torch.Tensor:
    """The model's output for one query, through every pipeline stage, on every stage (e.g. to
    compare models sharded differently)."""
    return nograd_pass(model, None, [[query]], get_forward_backward_func())[0][0]
