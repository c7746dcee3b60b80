"""The forward and backward passes of one iteration: the flow-matching objective until
--apex-start-iter, the APEX objective from there on, run either inside megatron's
forward/backward schedule ("direct", the single-stage path) or as the two-phase step (no-grad
pipeline passes, then one batched training pass: pipeline_apex.py), which pipeline parallelism
needs and which gives the same numbers up to floating-point batching.

Who answers which query: the DM term's real velocity comes from the frozen teacher under
--teacher frozen (else from the model itself), and under --lora-fake-reference base the fake
reference's queries go to the base (the model with its adapters off).
"""

from functools import partial
from typing import Dict, List

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_apex import gpu
from megatron_apex.lora.fake_reference import BaseFakeReference, BaseModel, route_fake_queries_to_base
from megatron_apex.objectives.apex import apex_loss, two_phase_apex
from megatron_apex.objectives.fm import fm_loss
from megatron_apex.training.config import RunConfig
from megatron_apex.training.pipeline_apex import FlowMatchingObjective, terms_report, two_phase_step


def _loss_func(terms: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
    return output_tensor, terms_report(terms)


class ObjectiveStep:
    def __init__(self, cfg: RunConfig, apex_config, strategy, two_phase: bool, model, ddp_model,
                 num_microbatches: int, empty_prompt):
        self.cfg, self.apex_config, self.strategy, self.two_phase = cfg, apex_config, strategy, two_phase
        self.model, self.ddp_model, self.num_microbatches = model, ddp_model, num_microbatches
        self.empty_prompt = empty_prompt  # (context, mask) of the CFG-enhanced target's unconditional query

    def apex_active(self, iteration: int) -> bool:
        return self.apex_config is not None and iteration >= self.cfg.objective.apex_start_iter

    def needs_teacher(self, iteration: int) -> bool:
        return (self.apex_active(iteration) and self.cfg.objective.teacher == "frozen"
                and self.apex_config.variant == "released")

    def _base_fake_reference(self, iteration: int) -> bool:
        return self.strategy.fake_reference_is_base and self.apex_active(iteration)

    def _step_teacher(self, teacher):
        """The real velocity's model of this iteration's DM query (None = the model itself)."""
        return teacher if self.cfg.objective.teacher == "frozen" else None

    def forward_backward(self, batches: List[Dict], iteration: int, teacher) -> List[Dict]:
        """Every micro-batch's forward and backward pass; their loss-term reports."""
        if self.two_phase:
            return two_phase_step(self.ddp_model, [self.two_phase_objective(b, iteration, teacher) for b in batches],
                                  teacher=self._two_phase_teacher(iteration, teacher),
                                  forward_context=partial(gpu.fp8_context, self.cfg.gpu, self.model))
        forward_backward = get_forward_backward_func()
        return forward_backward(
            forward_step_func=partial(self._forward_step, iteration, teacher), data_iterator=iter(batches),
            model=[self.ddp_model], num_microbatches=self.num_microbatches, seq_length=0,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)

    def _forward_step(self, iteration: int, teacher, data_iterator, model):
        """megatron's forward step: one micro-batch's loss terms."""
        batch = next(data_iterator)
        if self._base_fake_reference(iteration):
            model = BaseFakeReference(model)
        args = (model, batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        with gpu.fp8_context(self.cfg.gpu, self.model):
            if self.apex_active(iteration):
                uncond = self.empty_prompt if self.apex_config.cfg_scale > 0 else (None, None)
                terms = apex_loss(*args, self.apex_config, generator=batch["generator"],
                                  teacher=self._step_teacher(teacher),
                                  step=iteration - self.cfg.objective.apex_start_iter,
                                  uncond_context=uncond[0], uncond_context_mask=uncond[1])
            else:
                terms = fm_loss(*args)
        return terms["loss"], partial(_loss_func, terms)

    def two_phase_objective(self, batch: Dict, iteration: int, teacher):
        """One micro-batch's objective for the two-phase step."""
        args = (batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        if self.apex_active(iteration):
            objective = two_phase_apex(*args, self.apex_config, generator=batch["generator"],
                                       teacher=self._step_teacher(teacher) is not None,
                                       step=iteration - self.cfg.objective.apex_start_iter)
            if self._base_fake_reference(iteration):
                objective = route_fake_queries_to_base(objective)
            return objective
        return FlowMatchingObjective(*args)

    def _two_phase_teacher(self, iteration: int, teacher):
        """Who answers the teacher slot of the two-phase passes: the base (adapters off) under
        --lora-fake-reference base, else the step's teacher."""
        if self._base_fake_reference(iteration):
            return BaseModel(self.ddp_model)
        return self._step_teacher(teacher)
