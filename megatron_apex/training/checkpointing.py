"""Megatron-core distributed checkpoints under `<save>/iter_XXXXXXX/`.

A save is written into `<save>/.tmp_iter_XXXXXXX/`, then renamed into place, and only then does
`<save>/latest` name it: a crash at any moment leaves either the previous complete checkpoint
or the new one as `latest`, never a half-written one. Besides the sharded tensors, every
checkpoint holds `train_state.json` (iteration, consumed samples, scheduler state, the run's
flags, the model config) so that tools can rebuild the model without the original command line.
"""

import json
import os
import shutil
from typing import Dict, Optional

import torch.distributed as dist

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


def save_checkpoint(save: str, iteration: int, sharded_state_dict: Dict, train_state: Dict) -> str:
    """Collective: every rank calls it with its own shards."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(save, iteration)
    tmp = os.path.join(save, f".tmp_iter_{iteration:07d}")
    if _is_rank0():
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
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
    _barrier()
    return final


def resolve_checkpoint(load: str, flag: str = "--load") -> str:
    """The complete checkpoint directory a `--load` path refers to: either a save directory
    (its `latest` marker is followed) or one `iter_XXXXXXX` directory."""
    if not os.path.exists(load):
        raise FileNotFoundError(f"{flag} {load}: no such directory")
    if os.path.isfile(os.path.join(load, TRAIN_STATE)):
        return load
    marker = os.path.join(load, LATEST)
    if not os.path.isfile(marker):
        raise FileNotFoundError(
            f"{flag} {load}: no '{LATEST}' marker and no {TRAIN_STATE}; not a megatron_apex checkpoint directory")
    text = open(marker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{flag} {load}: '{LATEST}' marker holds {text!r}, expected an iteration number")
    ckpt = checkpoint_dir(load, int(text))
    if not os.path.isfile(os.path.join(ckpt, TRAIN_STATE)):
        raise FileNotFoundError(f"{flag} {load}: '{LATEST}' names {ckpt}, which is missing or incomplete")
    return ckpt


def has_checkpoint(load: Optional[str]) -> bool:
    return bool(load) and os.path.isfile(os.path.join(load, LATEST))


def read_train_state(ckpt: str) -> Dict:
    with open(os.path.join(ckpt, TRAIN_STATE)) as f:
        return json.load(f)


def load_checkpoint(ckpt: str, sharded_state_dict: Dict) -> Dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, ckpt)



def strip_prefix(state_dict: Dict, prefix: str) -> Dict:
    """A loaded sub-dict (saved with `sharded_state_dict(prefix=...)`) as the module's own keys."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
