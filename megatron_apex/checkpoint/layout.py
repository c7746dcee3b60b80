"""Where a checkpoint lies: `<save>/iter_XXXXXXX/` directories, the `<save>/latest` marker and
each checkpoint's `train_state.json`.

A checkpoint is complete once it is published: it is renamed into `iter_XXXXXXX` only after all
its files and `train_state.json` are written, and only then does `latest` name it. So a crash at
any moment leaves the previous complete checkpoint or the new one, never a half-written one; a
`latest` that lags behind (the run died between the rename and the marker) is corrected by
`resolve_checkpoint`. `train_state.json` holds the iteration, consumed samples, scheduler state,
the run's flags and the model config, so that tools rebuild the model without the original
command line.
"""

import json
import os
import re
import shutil
from typing import Dict, List, Optional

LATEST = "latest"
TRAIN_STATE = "train_state.json"

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def staging_dir(save: str, iteration: int) -> str:
    """Where a save of ``iteration`` is written before it is published (renamed into place)."""
    return os.path.join(save, f".tmp_iter_{iteration:07d}")


def write_json_atomic(path: str, payload: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(save: str) -> List[int]:
    """Iterations of the complete checkpoints under `save`, oldest first (complete = published:
    an `iter_XXXXXXX` directory holding `train_state.json`)."""
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
        trash = staging_dir(save, iteration) + ".deleting"
        os.rename(checkpoint_dir(save, iteration), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def resolve_checkpoint(load: str, what: Optional[str] = None, log=None) -> str:
    """The complete checkpoint directory ``load`` refers to: one `iter_XXXXXXX` directory, or a
    save directory, whose newest complete checkpoint is taken. That is the one its `latest`
    marker names unless the run died between publishing a checkpoint and moving the marker (or
    the marker was lost); then the newest complete one wins and `log` (a print function) says
    so. ``what``: how the caller's user named the path (e.g. the flag "--load"), put before it
    in every message."""
    where = f"{what} {load}" if what else load
    if not os.path.exists(load):
        raise FileNotFoundError(f"{where}: no such directory")
    if os.path.isfile(os.path.join(load, TRAIN_STATE)):
        return load
    complete = complete_checkpoints(load)
    marker = os.path.join(load, LATEST)
    if not os.path.isfile(marker):
        if not complete:
            raise FileNotFoundError(f"{where}: no '{LATEST}' marker and no complete iter_* checkpoint; "
                                    "not a megatron_apex checkpoint directory")
        named = None
    else:
        text = open(marker).read().strip()
        named = int(text) if text.isdigit() else None
        if named is None and not complete:
            raise ValueError(f"{where}: '{LATEST}' marker holds {text!r}, expected an iteration number")
        if named is not None and not complete:
            raise FileNotFoundError(f"{where}: '{LATEST}' names {checkpoint_dir(load, named)}, which is "
                                    "missing or incomplete, and no other complete checkpoint exists")
    newest = complete[-1]
    if named != newest and log is not None:
        log(f"[megatron_apex] {where}: '{LATEST}' names "
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
