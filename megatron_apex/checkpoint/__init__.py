"""The checkpoint format the trainer writes and training, conversion and inference read:
megatron-core distributed checkpoints under `<save>/iter_XXXXXXX/`, the `latest` marker and
`train_state.json` (layout.py), the sharded save and load (sharded.py), and the checks that keep
what a checkpoint holds data (safety.py)."""

from megatron_apex.checkpoint.layout import (
    LATEST,
    TRAIN_STATE,
    checkpoint_dir,
    complete_checkpoints,
    prune_checkpoints,
    read_train_state,
    resolve_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from megatron_apex.checkpoint.safety import (
    UnsafePickleError,
    check_checkpoint_pickles,
    load_data_pickle,
    load_weights_only,
    reading_checkpoint,
)
from megatron_apex.checkpoint.sharded import (
    check_checkpoint_files,
    load_checkpoint,
    mark_tp_replicas,
    module_state_dict,
    save_checkpoint,
    strip_prefix,
)

__all__ = [
    "LATEST",
    "TRAIN_STATE",
    "UnsafePickleError",
    "check_checkpoint_files",
    "check_checkpoint_pickles",
    "checkpoint_dir",
    "complete_checkpoints",
    "load_checkpoint",
    "load_data_pickle",
    "load_weights_only",
    "mark_tp_replicas",
    "module_state_dict",
    "prune_checkpoints",
    "read_train_state",
    "reading_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "strip_prefix",
    "write_json_atomic",
    "write_text_atomic",
]
