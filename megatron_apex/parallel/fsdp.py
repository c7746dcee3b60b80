"""Fully sharded data parallelism (``--fsdp``, ZeRO-3) for full-parameter training: torch's
FSDP2 (``torch.distributed.fsdp.fully_shard``) over megatron's data-parallel group, driven by
megatron-core's own optimizer, schedule and distributed checkpoints.

Each transformer layer and then the whole model are ``fully_shard``-ed: every parameter
becomes a DTensor holding 1/DP of its rows on each rank (torch.chunk along dim 0, so a
tensor whose rows do not divide evenly leaves the last ranks fewer, or none). A layer's
parameters are all-gathered just before its forward and its backward and freed after them;
its gradients are reduce-scattered in the backward (in fp32, like megatron's
``grad_reduce_in_fp32``) into gradient shards of the parameters' dtype. megatron-core's
non-distributed optimizer (Adam, with fp32 master shards under ``--bf16``) then steps the
shards: weights, gradients and optimizer state are all 1/DP per rank. The EMA and the frozen
teacher are sharded the same way (``shard_model(frozen=True)`` on their own copy), so the EMA
update is shard-local and the teacher's forward gathers one layer at a time. Gradient
accumulation over micro-batches reduce-scatters after every micro-batch's backward (megatron's
``no_sync`` does nothing here): holding the unsharded gradients until the last one would undo
the sharding.

Why torch FSDP2 and not Megatron-FSDP (``megatron.core.distributed.fsdp``, megatron-core
0.16.1): Megatron-FSDP creates CUDA streams at construction (``torch.cuda.Stream()`` in
``MegatronFSDP._init_fsdp_param_and_grad_buffer``), needs ``einops`` (not a dependency here),
and its optimizer checkpoints only in the ``fsdp_dtensor`` format (torch DCP outside
megatron's dist_checkpointing), so it neither runs on CPU/gloo nor writes the checkpoints the
rest of this project reads. megatron-core's own FSDP2 wrapper (``TorchFullyShardedDataParallel``)
hard-codes a CUDA device mesh and lacks the ``finish_grad_sync(force_all_reduce=...)`` argument
its schedule passes; ``FullyShardedModel`` below is that wrapper made device-agnostic.

Checkpoints are megatron dist_checkpointing with the same keys and global shapes as a plain
data-parallel run: each rank writes its own row slice of every tensor (``sharded_state_dict``),
so a checkpoint reshards freely between FSDP, plain DP and one process.

Not combined with tensor or pipeline parallelism, LoRA, --use-distributed-optimizer (FSDP
already shards the optimizer), FP8 or the two-phase APEX step (refused at start, see
``check_fsdp_config``). Each rank builds the model, and each frozen copy, whole before sharding it.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import optimizer as mcore_optimizer
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed.data_parallel_base import _BaseDataParallel
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from megatron.core.utils import make_sharded_tensor_for_checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def check_fsdp_config(cfg) -> None:
    """What --fsdp does not run with, refused before anything is built (one line naming both
    flags)."""
    if not cfg.parallel.fsdp:
        return
    par = cfg.parallel
    clashes = [
        (par.tensor_model_parallel_size > 1, f"--tensor-model-parallel-size {par.tensor_model_parallel_size}"),
        (par.pipeline_model_parallel_size > 1, f"--pipeline-model-parallel-size {par.pipeline_model_parallel_size}"),
        (par.use_distributed_optimizer, "--use-distributed-optimizer (FSDP shards the optimizer state itself)"),
        (cfg.lora.enabled, f"--lora-rank {cfg.lora.rank} (FSDP is for full-parameter training)"),
        (bool(cfg.gpu.fp8_format), f"--fp8-format {cfg.gpu.fp8_format}"),
        (cfg.objective.schedule == "two-phase", "--apex-schedule two-phase"),
    ]
    for clash, flag in clashes:
        if clash:
            raise ValueError(f"--fsdp cannot run with {flag}")


def _mesh():
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(ps.get_data_parallel_group(with_context_parallel=True), device_type)


def _param_attributes(module: torch.nn.Module) -> Dict[str, Dict]:
    # megatron's optimizer reads attributes set on the parameters (tensor_model_parallel,
    # allreduce, ...), which fully_shard's new DTensor parameters do not carry over
    return {name: dict(vars(p)) for name, p in module.named_parameters()}


def shard_model(model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
    """``fully_shard`` each of ``model.layers``, then ``model`` itself (in place; returns it).
    A trained model's root keeps its own parameters (embedders, output head) gathered from the
    forward to the backward, FSDP's default; a ``frozen`` copy (teacher, EMA) never runs a
    backward, so its root reshards after every forward like its layers."""
    mesh = _mesh()
    attributes = _param_attributes(model)
    # reduce-scatter in fp32 (megatron's grad_reduce_in_fp32); the shards keep the parameters' dtype
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in getattr(model, "layers", []):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
    for name, p in model.named_parameters():
        for key, value in attributes.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    return model


class FullyShardedModel(_BaseDataParallel):
    """The training loop's data-parallel wrapper around a ``shard_model``-ed model: FSDP2
    reduce-scatters the gradients inside the backward, so megatron's sync calls have little
    to do."""

    def __init__(self, module: torch.nn.Module, ddp_config):
        super().__init__(config=module.config, module=module)
        self.ddp_config = ddp_config  # megatron's optimizer factory reads it

    @torch.no_grad()
    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Called by megatron's finalize_model_grads after the last micro-batch's backward.
        A parameter the step did not reach (the last layer's text-stream output) gets a zero
        gradient, as megatron's DDP gives every parameter its grad buffer: Adam then keeps
        state for it (the checkpoint holds the same entries) and weight decay moves it alike."""
        for p in self.module.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def local_grads(self) -> List[torch.Tensor]:
        """This rank's gradient shards."""
        return [local_tensor(p.grad) for p in self.module.parameters() if p.grad is not None]


def is_dtensor(tensor) -> bool:
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own storage of a DTensor, the very tensor object every time (megatron's
    optimizer checkpoint finds a parameter's sharded entry by ``id`` of it; ``to_local()``
    of a parameter returns a fresh view per call), else the tensor."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


@contextlib.contextmanager
def optimizer_matches_local_shards():
    """While megatron-core 0.16's optimizer checkpoint maps optimizer state to the model's
    sharded entries: it pairs them by ``id(to_local_if_dtensor(param))``, and torch's
    ``to_local()`` gives a parameter DTensor a fresh view per call (torch gh-166156), so no
    FSDP parameter would ever match; pair them by the local shard itself."""
    original = mcore_optimizer.to_local_if_dtensor
    mcore_optimizer.to_local_if_dtensor = local_tensor
    try:
        yield
    finally:
        mcore_optimizer.to_local_if_dtensor = original


# ---------------------------------------------------------------------------------------------
# Checkpoints

def _row_slice(value, key: str):
    """The ShardedTensor of this rank's rows of a sharded parameter (global shape and offset
    as the whole tensor has them; rows need not divide evenly over the ranks)."""
    local = local_tensor(value)
    shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"{key}: FSDP shard of shape {tuple(local.shape)}, expected {tuple(shape)}")
    return ShardedTensor(key=key, data=local, dtype=local.dtype, local_shape=tuple(local.shape),
                         global_shape=tuple(value.shape), global_offset=tuple(offset), axis_fragmentations=None,
                         replica_id=(0, 0, 0))


def sharded_state_dict(module: torch.nn.Module, prefix: str) -> Dict:
    """megatron's sharded state dict of a ``shard_model``-ed module under the keys a plain
    data-parallel run gives it (``prefix`` + state-dict name; TP = PP = 1): each rank is the
    one writer of its row slice of every sharded parameter, rank 0 of what is replicated."""
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        key = prefix + name
        if name.endswith("_extra_state"):
            out[key] = make_sharded_object_for_checkpoint(value, key, replica_id=(0, 0, dp_rank))
        elif is_dtensor(value):
            out[key] = _row_slice(value, key)
        else:
            out[key] = make_sharded_tensor_for_checkpoint(value, key)
    return out


@torch.no_grad()
def load_local_state(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy a loaded state (keys without prefix; a sharded parameter's entry is this rank's row
    slice, as ``sharded_state_dict`` asked for it) into ``module``; every key must match."""
    own = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint entries do not fit the model: missing {missing}, unexpected {unexpected}")
    plain = {}
    for name, value in own.items():
        if is_dtensor(value):
            local_tensor(value).copy_(state[name])
        else:
            plain[name] = state[name]
    if plain:
        module.load_state_dict(plain, strict=False)


def _like(value: torch.Tensor, param) -> torch.Tensor:
    if tuple(value.shape) != tuple(local_tensor(param).shape):
        raise ValueError(f"optimizer state of shape {tuple(value.shape)} for a parameter shard of shape "
                         f"{tuple(local_tensor(param).shape)}")
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def shard_loaded_optimizer_state(optimizer, state_dict: Dict) -> None:
    """A loaded optimizer state holds this rank's row slices as plain tensors (as
    ``sharded_state_dict`` asked for them); make those of sharded parameters DTensors laid out
    like their parameter, in place, before megatron's ``load_state_dict`` copies them into (or
    installs them beside) DTensors. The layouts: a chained optimizer's parts (one state dict
    each, or the one part's own), Adam's per-parameter state keyed by position, and the fp32
    master shards of ``--bf16``."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    inners = [getattr(part, "optimizer", None) for part in parts]
    if not any(is_dtensor(p) for inner in inners if inner is not None for group in inner.param_groups
               for p in group["params"]):
        return
    per_part = [state_dict] if len(parts) == 1 else [state_dict[i] for i in range(len(parts))]
    for part, part_state in zip(parts, per_part):
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        adam = part_state.get("optimizer", part_state)
        for index, state in adam.get("state", {}).items():
            if isinstance(index, int) and index < len(params) and is_dtensor(params[index]):
                for key, value in state.items():
                    if torch.is_tensor(value) and not is_dtensor(value) and value.dim() > 0:
                        state[key] = _like(value, params[index])
        for group, masters in zip(part_state.get("fp32_from_fp16_params", []),
                                  getattr(part, "fp32_from_float16_groups", [])):
            for i, (value, master) in enumerate(zip(group, masters)):
                if is_dtensor(master) and torch.is_tensor(value) and not is_dtensor(value):
                    group[i] = _like(value, master)
