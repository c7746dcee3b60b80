"""Reading a checkpoint's full (TP=1) tensors one group at a time, without building a model:
what export to diffusers streams from (megatron_apex/conversion/hf_export.py).

An entry is (ShardedTensor key, global shape, dtype) of one of our tensors; torch DCP
assembles each full tensor from whatever TP/PP pieces the run saved.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader

from megatron_apex.checkpoint.safety import reading_checkpoint
from megatron_apex.sizing import bounded_runs, tensor_nbytes

Entry = Tuple[str, Tuple[int, ...], torch.dtype]


def saved_tensors_metadata(ckpt: str) -> Dict:
    """{ShardedTensor key: its metadata (global_shape, dtype)} of a checkpoint."""
    return dist_checkpointing.load_tensors_metadata(ckpt)


class _MetadataOnceReader(FileSystemReader):
    """torch DCP's FileSystemReader reading ``.metadata`` once for all the loads it serves
    (the caller has checked the pickle, ``checkpoint.check_checkpoint_pickles``)."""

    def read_metadata(self):
        if getattr(self, "_metadata", None) is None:
            self._metadata = super().read_metadata()
        return self._metadata


def _groups(entries: Mapping[str, Entry], order: Sequence[str], group_bytes: int) -> List[List[str]]:
    """``order`` cut into runs of at most ``group_bytes`` (a larger tensor alone)."""
    sizes = [tensor_nbytes(entries[key][1], entries[key][2]) for key in order]
    return [[order[i] for i in run] for run in bounded_runs(sizes, group_bytes)]


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """Our TP=1 tensors of one checkpoint, read when asked for: keys are grouped in ``order``
    into reads of at most ``group_bytes`` (a larger tensor is read alone; the read assembles
    full tensors from whatever TP/PP pieces were saved), the group of the key asked for is
    read, and each tensor is handed out once and forgotten, so memory holds one group.
    ``on_read(keys)`` (tests, measurements) sees every read."""

    def __init__(self, ckpt: str, entries: Mapping[str, Entry], order: Sequence[str], group_bytes: int,
                 on_read: Optional[Callable[[List[str]], None]] = None):
        self.ckpt, self.entries, self.on_read = ckpt, dict(entries), on_read
        self.groups = _groups(self.entries, order, group_bytes)
        self._group_of = {key: i for i, group in enumerate(self.groups) for key in group}
        self._held: Dict[str, torch.Tensor] = {}
        self._reader = None

    def _read(self, group: List[str]) -> Dict[str, torch.Tensor]:
        """One torch-DCP read of the group's full tensors (megatron's checkpoints are torch DCP
        checkpoints keyed by ShardedTensor key; DCP assembles a full tensor from the stored
        TP pieces). Straight DCP rather than ``dist_checkpointing.load``: that one unpickles
        the checkpoint's metadata on every call, most of an export's time at ~40 ms a call."""
        if self._reader is None:
            self._reader = _MetadataOnceReader(self.ckpt)
        request = {}
        for key in group:
            sharded_key, shape, dtype = self.entries[key]
            request[sharded_key] = torch.empty(shape, dtype=dtype)
        if self.on_read is not None:
            self.on_read(list(group))
        # no_dist is the point: one process reads
        with warnings.catch_warnings(), reading_checkpoint(self.ckpt, self._reader.read_metadata()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(request, storage_reader=self._reader, no_dist=True)
        return {key: request[self.entries[key][0]] for key in group}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._held:
            self._held = {}  # let the previous group go before reading the next
            self._held = self._read(self.groups[self._group_of[key]])
        return self._held.pop(key)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries


class MetaTensors(Mapping[str, torch.Tensor]):
    """The same keys as a :class:`CheckpointTensors`, as meta tensors (the export's layout)."""

    def __init__(self, entries: Mapping[str, Entry]):
        self.entries = entries

    def __getitem__(self, key: str) -> torch.Tensor:
        _, shape, dtype = self.entries[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)
