"""Saving and loading the sharded tensors of a checkpoint with megatron-core's
dist_checkpointing: every rank writes its own shards, and a load reshards to whatever TP/PP
the loader runs with. A save is published as layout.py describes; a load reads every byte of
the checkpoint as data (safety.py) and turns a missing, truncated or corrupt file into one line
naming it.
"""

import json
import os
import re
import shutil
from typing import Dict, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_apex.checkpoint.layout import (
    LATEST,
    TRAIN_STATE,
    checkpoint_dir,
    prune_checkpoints,
    staging_dir,
    write_json_atomic,
    write_text_atomic,
)
from megatron_apex.checkpoint.safety import check_checkpoint_pickles, reading_checkpoint, storage_items


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mark_tp_replicas(sharded_state_dict: Dict) -> Dict:
    """Make TP rank 0 the only main replica of every tensor that each tensor-parallel rank
    holds whole (in place; returns the dict).

    megatron-core 0.16's `sharded_state_dict_default` (used for modules without a sharded
    state dict of their own, e.g. a plain nn.Linear) passes the data-parallel group but no
    tensor-parallel group, so such tensors get replica_id (0, 0, dp) on EVERY TP rank; the
    checkpoint then has several main replicas of one tensor and saving (or loading) at TP > 1
    fails with "Invalid access pattern". A tensor not split along any axis is held whole by
    every TP rank of its stage, which is what replica_id[1] = tp_rank says."""
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
    final = checkpoint_dir(save, iteration)
    tmp = staging_dir(save, iteration)
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
        write_text_atomic(os.path.join(save, LATEST), f"{iteration}\n")
        if keep_last:
            prune_checkpoints(save, keep_last)
    _barrier()
    return final


def load_checkpoint(ckpt: str, sharded_state_dict: Dict) -> Dict:
    """megatron-core's load of ``ckpt``, reading every byte of it as data (see ``safety``): a
    planted pickle, a missing, truncated or corrupt file is one line naming the file."""
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
