"""The optimizer's part of a training checkpoint. megatron-core 0.16's distributed optimizer
with plain torch Adam (the path without Transformer Engine / Apex) cannot round-trip its state
as it is (measured on 0.15.3 and 0.16.1): its default format fails on save; "fully_reshardable"
(the format used here: model-space tensors, so it also reshards across TP/PP/DP) asserts on a
fresh optimizer and raises KeyError 'step' on load; and, silently, its load gives every
parameter THE SAME `step` tensor, which Adam then increments once per parameter per step, so
the bias correction of a resumed run is wrong and its losses diverge.
`optimizer_sharded_state_dict` and `load_optimizer_state` make it round-trip.

Only the trainer saves and loads optimizer state (conversion and inference read the model
weights alone), so this lives with training rather than with the checkpoint format.
"""

import contextlib
from typing import Dict, Iterator, List

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_apex.parallel.fsdp import optimizer_matches_local_shards, shard_loaded_optimizer_state

DISTRIBUTED_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _distributed_parts(optimizer) -> List:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, DistributedOptimizer)]


def _init_fresh_state(part) -> None:
    """Give a never-stepped distributed optimizer Adam state with a per-parameter `step`, which
    its `state_dict()` (called while building the sharded state dict) needs."""
    inner = part.optimizer
    if part.init_state_fn is not None:
        part.init_state_fn(inner, part.config)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if state and "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: Dict, is_loading: bool) -> Dict:
    if is_loading:
        for part in _distributed_parts(optimizer):
            _init_fresh_state(part)
    with optimizer_matches_local_shards():  # (--fsdp's parameters; nothing changes without them)
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                            metadata=dict(DISTRIBUTED_OPTIMIZER_FORMAT))


@contextlib.contextmanager
def _copy_states_without_step(part) -> Iterator[None]:
    # "fully_reshardable" keeps no per-parameter step (it travels in the param groups); the
    # per-parameter copy would look it up in the loaded tensors and fail.
    original = part._set_main_param_and_optimizer_states

    def copy_without_step(model_param, tensors):
        group_index, group_order = part.model_param_group_index_map[model_param]
        state = part.optimizer.state[part.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    part._set_main_param_and_optimizer_states = copy_without_step
    try:
        yield
    finally:
        del part._set_main_param_and_optimizer_states


def load_optimizer_state(optimizer, state_dict: Dict) -> None:
    """`optimizer.load_state_dict`, then every parameter gets a `step` tensor of its own (under
    --fsdp the loaded shards become DTensors first: parallel/fsdp.py)."""
    shard_loaded_optimizer_state(optimizer, state_dict)
    parts = _distributed_parts(optimizer)
    with contextlib.ExitStack() as stack:
        for part in parts:
            if not part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                stack.enter_context(_copy_states_without_step(part))
        optimizer.load_state_dict(state_dict)
    for part in parts:
        for state in part.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
