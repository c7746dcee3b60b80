"""Megatron-core distributed checkpoints under `<save>/iter_XXXXXXX/`.

A save is written into `<save>/.tmp_iter_XXXXXXX/`, then renamed into place, and only then does
`<save>/latest` name it: a crash at any moment leaves either the previous complete checkpoint
or the new one as `latest`, never a half-written one. Besides the sharded tensors, every
checkpoint holds `train_state.json` (iteration, consumed samples, scheduler state, the run's
flags, the model config) so that tools can rebuild the model without the original command line.

Optimizer state goes through `optimizer_sharded_state_dict` / `load_optimizer_state`, which
make megatron-core's distributed optimizer checkpoint correctly with plain torch Adam (no
Transformer Engine / Apex), see `load_optimizer_state`.
"""

import contextlib
import json
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional

import torch.distributed as dist

from megatron_apex.untrusted import check_checkpoint_pickles, reading_checkpoint, storage_items

LATEST = "latest"
TRAIN_STATE = "train_state.json"


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_json_atomic(path: str, payload: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_tp_replicas(sharded_state_dict: Dict) -> Dict:
    """Make TP rank 0 the only main replica of every tensor that each tensor-parallel rank
    holds whole (in place; returns the dict).

    megatron-core 0.16's `sharded_state_dict_default` (used for modules without a sharded
    state dict of their own, e.g. a plain nn.Linear) passes the data-parallel group but no
    tensor-parallel group, so such tensors get replica_id (0, 0, dp) on EVERY TP rank; the
    checkpoint then has several main replicas of one tensor and saving (or loading) at TP > 1
    fails with "Invalid access pattern". A tensor not split along any axis is held whole by
    every TP rank of its stage, which is what replica_id[1] = tp_rank says."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return sharded_state_dict
    tp_rank = ps.get_tensor_model_parallel_rank()
    for value in nested_values(sharded_state_dict):
        if (isinstance(value, ShardedTensor) and all(f == 1 for f in value.axis_fragmentations)
                and isinstance(value.replica_id, tuple) and len(value.replica_id) == 3 and value.replica_id[1] == 0):
            value.replica_id = (value.replica_id[0], tp_rank, value.replica_id[2])
    return sharded_state_dict


def save_checkpoint(save: str, iteration: int, sharded_state_dict: Dict, train_state: Dict,
                    keep_last: Optional[int] = None) -> str:
    """Collective: every rank calls it with its own shards. With `keep_last`, only the newest
    `keep_last` complete checkpoints remain afterwards."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(save, iteration)
    tmp = os.path.join(save, f".tmp_iter_{iteration:07d}")
    if _is_rank0():
        os.makedirs(save, exist_ok=True)
        for name in os.listdir(save):  # leftovers of saves that were killed
            if name.startswith(".tmp_iter_"):
                shutil.rmtree(os.path.join(save, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, tmp)
    _barrier()
    if _is_rank0():
        write_json_atomic(os.path.join(tmp, TRAIN_STATE), train_state)
        if os.path.exists(final):  # the same iteration saved again after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomic(os.path.join(save, LATEST), f"{iteration}\n")
        if keep_last:
            prune_checkpoints(save, keep_last)
    _barrier()
    return final


_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def complete_checkpoints(save: str) -> List[int]:
    """Iterations of the complete checkpoints under `save`, oldest first. Complete = published:
    a checkpoint is renamed into `iter_XXXXXXX` only after all its files and `train_state.json`
    are written."""
    if not os.path.isdir(save):
        return []
    found = []
    for name in os.listdir(save):
        m = _ITER_DIR.match(name)
        if m and os.path.isfile(os.path.join(save, name, TRAIN_STATE)):
            found.append(int(m.group(1)))
    return sorted(found)


def prune_checkpoints(save: str, keep_last: int) -> List[int]:
    """Delete all but the newest `keep_last` complete checkpoints; returns the deleted ones."""
    if keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {keep_last}")
    doomed = complete_checkpoints(save)[:-keep_last]
    for iteration in doomed:
        # Renamed away first so a crash mid-delete never leaves a partial `iter_*` directory
        # that looks complete.
        trash = os.path.join(save, f".tmp_iter_{iteration:07d}.deleting")
        os.rename(checkpoint_dir(save, iteration), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def resolve_checkpoint(load: str, flag: str = "--load", log=None) -> str:
    """The complete checkpoint directory a `--load` path refers to: one `iter_XXXXXXX`
    directory, or a save directory, whose newest complete checkpoint is taken. That is the one
    its `latest` marker names unless the run died between publishing a checkpoint and moving
    the marker (or the marker was lost); then the newest complete one wins and `log` (a print
    function) says so."""
    if not os.path.exists(load):
        raise FileNotFoundError(f"{flag} {load}: no such directory")
    if os.path.isfile(os.path.join(load, TRAIN_STATE)):
        return load
    complete = complete_checkpoints(load)
    marker = os.path.join(load, LATEST)
    if not os.path.isfile(marker):
        if not complete:
            raise FileNotFoundError(f"{flag} {load}: no '{LATEST}' marker and no complete iter_* checkpoint; "
                                    "not a megatron_apex checkpoint directory")
        named = None
    else:
        text = open(marker).read().strip()
        named = int(text) if text.isdigit() else None
        if named is None and not complete:
            raise ValueError(f"{flag} {load}: '{LATEST}' marker holds {text!r}, expected an iteration number")
        if named is not None and not complete:
            raise FileNotFoundError(f"{flag} {load}: '{LATEST}' names {checkpoint_dir(load, named)}, which is "
                                    "missing or incomplete, and no other complete checkpoint exists")
    newest = complete[-1]
    if named != newest and log is not None:
        log(f"[megatron_apex] {flag} {load}: '{LATEST}' names "
            f"{'nothing usable' if named is None else f'iteration {named}'}; taking the newest complete "
            f"checkpoint, iteration {newest}")
    return checkpoint_dir(load, newest)


def read_train_state(ckpt: str, required=()) -> Dict:
    """`<ckpt>/train_state.json`; an unreadable file, or one lacking a `required` key, is a
    one-line error naming it."""
    path = os.path.join(ckpt, TRAIN_STATE)
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable train state ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (not a complete megatron_apex checkpoint)")
    return state


def load_checkpoint(ckpt: str, sharded_state_dict: Dict) -> Dict:
    """megatron-core's load of ``ckpt``, reading every byte of it as data (see
    ``untrusted``): a planted pickle, a missing, truncated or corrupt file is one line naming
    the file."""
    from megatron.core import dist_checkpointing

    metadata = check_checkpoint_pickles(ckpt)
    check_checkpoint_files(ckpt, metadata)
    with reading_checkpoint(ckpt, metadata):
        return dist_checkpointing.load(sharded_state_dict, ckpt)


def check_checkpoint_files(ckpt: str, metadata=None) -> None:
    """Every data file the checkpoint's metadata lists is there and long enough for the items
    it holds, and megatron's `metadata.json` parses: a missing or truncated file otherwise
    surfaces as torch's CheckpointException, a BaseException with a multi-line report.
    ``metadata``: the checkpoint's `.metadata`, where the caller has read it already."""
    megatron_json = os.path.join(ckpt, "metadata.json")
    if os.path.isfile(megatron_json):
        try:
            with open(megatron_json) as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{megatron_json}: not a readable megatron checkpoint description ({err})") from None
    if metadata is None and not os.path.isfile(os.path.join(ckpt, ".metadata")):
        return
    storage = storage_items(ckpt, metadata)
    needed: Dict[str, int] = {}
    for info in storage.values():
        end = getattr(info, "offset", 0) + getattr(info, "length", 0)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    missing = [name for name in sorted(needed) if not os.path.isfile(os.path.join(ckpt, name))]
    if missing:
        raise FileNotFoundError(f"{ckpt}: checkpoint data file(s) missing: {', '.join(missing)}")
    for name, end in sorted(needed.items()):
        size = os.path.getsize(os.path.join(ckpt, name))
        if size < end:
            raise ValueError(f"{os.path.join(ckpt, name)}: truncated ({size} bytes, its items need {end})")



def strip_prefix(state_dict: Dict, prefix: str) -> Dict:
    """A loaded sub-dict (saved with `sharded_state_dict(prefix=...)`) as the module's own keys."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def module_state_dict(loaded: Dict, prefix: str, module) -> Dict:
    """A loaded sub-dict as ``module.load_state_dict`` wants it: prefix stripped and, for a
    pipeline stage, the global layer indices its `sharded_state_dict` keys layers by turned
    back into the stage's own (``module.layer_offset`` = the global index of its layer 0)."""
    offset = getattr(module, "layer_offset", 0)
    state = strip_prefix(loaded, prefix)
    if not offset:
        return state
    return {_LAYER_KEY.sub(lambda m: f"layers.{int(m.group(1)) - offset}.", k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Optimizer state. megatron-core 0.16's distributed optimizer with plain torch Adam (the path
# without Transformer Engine / Apex) cannot round-trip its state as it is
# (measured on 0.15.3 and 0.16.1): its default format fails on save; "fully_reshardable"
# (the format used here: model-space tensors, so it also reshards across TP/PP/DP) asserts on a
# fresh optimizer and raises KeyError 'step' on load; and, silently, its load gives every
# parameter THE SAME `step` tensor, which Adam then increments once per parameter per step, so
# the bias correction of a resumed run is wrong and its losses diverge.

DISTRIBUTED_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _distributed_parts(optimizer) -> List:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, DistributedOptimizer)]


def _init_fresh_state(part) -> None:
    """Give a never-stepped distributed optimizer Adam state with a per-parameter `step`, which
    its `state_dict()` (called while building the sharded state dict) needs."""
    import torch

    inner = part.optimizer
    if part.init_state_fn is not None:
        part.init_state_fn(inner, part.config)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if state and "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: Dict, is_loading: bool) -> Dict:
    from megatron_apex.parallel.fsdp import optimizer_matches_local_shards

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
    from megatron_apex.parallel.fsdp import shard_loaded_optimizer_state

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
