"""What a checkpoint holds stays data: nothing in it is unpickled with code-running power.

A megatron-core checkpoint holds pickles in three places: torch DCP's `.metadata`, which torch
reads with a plain `pickle.load` (it may name any callable, and unpickling calls it); megatron's
`common.pt`; and the non-tensor items inside the `.distcp` files (every `_extra_state`,
megatron's ShardedObjects), which torch DCP reads with `torch.load(weights_only=False)`.
`check_checkpoint_pickles` unpickles `.metadata` with an allowlist of exactly the data classes
DCP writes, and loads `common.pt` weights-only; `reading_checkpoint` makes torch's reader load
the `.distcp` items weights-only too. Weights-only loading admits tensors, plain containers and
the few classes megatron-core registers with torch as safe (its configs, enums, numpy arrays).
A planted payload fails with one line naming the file (and the item), and never runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
import zipfile
from typing import Dict, Iterator

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

# Exactly the classes torch DCP's `.metadata` is made of (dataclasses and enums: constructing
# them runs no user code). Listed one by one: allowing whole modules would also admit whatever
# those modules import (torch.Tensor, FileSystemWriter, ...).
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
}
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                    ("builtins", "slice"), *(("pathlib", cls) for cls in ("Path", "PosixPath", "PurePosixPath",
                                                                          "WindowsPath", "PureWindowsPath")),
                    *((module, cls) for module, classes in _DCP_CLASSES.items() for cls in classes)}


class UnsafePickleError(ValueError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise UnsafePickleError(f"{self.where}: refuses to unpickle global '{module}.{name}' "
                                "(not checkpoint metadata; the file may carry code)")


def load_data_pickle(path: str):
    """Unpickle `path` allowing only the data classes torch DCP metadata is made of."""
    with open(path, "rb") as f:
        payload = f.read()
    try:
        return _DataOnlyUnpickler(io.BytesIO(payload), path).load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_detail(exc: BaseException) -> str:
    """What torch's weights-only unpickler objected to, from its long message."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0]
    return _first_line(exc)


def load_weights_only(source, where: str):
    """``torch.load(source, weights_only=True)`` (tensors, plain containers and the classes
    megatron-core registers with torch as safe); a file that asks for anything else, or is not
    a torch file at all, is one line naming ``where``."""
    try:
        with warnings.catch_warnings():  # a hand-made pickle's protocol is not news: it is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"{where}: not plain data, refused by torch.load(weights_only=True) "
                                f"({_weights_only_detail(exc)}): corrupt, or carrying code") from None
    except Exception as exc:
        raise ValueError(f"{where}: corrupt or truncated ({type(exc).__name__}: {_first_line(exc)})") from None


def check_checkpoint_pickles(ckpt: str):
    """Refuse a checkpoint directory whose pickled files would run code when loaded: the
    `.metadata` torch unpickles with plain pickle, and `common.pt`. Returns the metadata (None
    without a `.metadata`)."""
    common = os.path.join(ckpt, "common.pt")
    if os.path.isfile(common):
        load_weights_only(common, common)
    metadata = os.path.join(ckpt, ".metadata")
    return load_data_pickle(metadata) if os.path.isfile(metadata) else None


def storage_items(ckpt: str, metadata=None) -> Dict:
    """Storage index -> where the item lies (file, offset, length), from ``metadata`` or else
    the `.metadata` file (unpickled data-only)."""
    if metadata is None:
        metadata = load_data_pickle(os.path.join(ckpt, ".metadata"))
    return getattr(metadata, "storage_data", None) or {}


@contextlib.contextmanager
def reading_checkpoint(ckpt: str, metadata=None) -> Iterator[None]:
    """Wrap every torch DCP / megatron-core read of ``ckpt`` in this. Within it torch DCP reads
    the non-tensor items of the `.distcp` files (megatron's ShardedObjects, every
    `_extra_state`) weights-only, and a failed read leaves as one line
    (``checkpoint_read_error``).

    torch's ``DefaultLoadPlanner.load_bytes`` (which megatron's load planner inherits) reads them
    with ``torch.load(weights_only=False)``: a pickle written over such an item runs its payload.
    Here the same placement is done on what ``load_weights_only`` returns, and a refused or
    unreadable item is one line naming its file and key. Tensor items are read weights-only by
    torch already. ``metadata``: the checkpoint's, where the caller has it already."""
    storage = storage_items(ckpt, metadata)

    def load_bytes(planner, read_item, value):
        info = storage.get(read_item.storage_index)
        where = f"{os.path.join(ckpt, info.relative_path if info else '?')} (item {read_item.dest_index.fqn})"
        obj = load_weights_only(value, where)
        if planner.flatten_state_dict:  # the placement of torch's DefaultLoadPlanner.load_bytes
            set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
        else:
            planner.state_dict[read_item.dest_index.fqn] = obj

    original = DefaultLoadPlanner.load_bytes
    DefaultLoadPlanner.load_bytes = load_bytes
    try:
        yield
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        raise checkpoint_read_error(ckpt, exc, storage) from None
    finally:
        DefaultLoadPlanner.load_bytes = original


def checkpoint_read_error(ckpt: str, exc: BaseException, storage: Dict) -> Exception:
    """The one-line error for a failed read of ``ckpt``. An error raised by this module inside
    torch's reader is unwrapped from torch's multi-line CheckpointException; a failure to
    decode data (a corrupt file) is traced to the first item that does not load, named with its
    file (this reads the items again, on the failure path only); anything else (a key or shape
    the checkpoint lacks) is its first line, naming the checkpoint."""
    inner = exc
    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))[0]
    if isinstance(inner, ValueError) and not isinstance(inner, pickle.UnpicklingError):
        return inner
    if isinstance(inner, (pickle.UnpicklingError, EOFError, RuntimeError, OSError, zipfile.BadZipFile)):
        for index, info in storage.items():
            path = os.path.join(ckpt, info.relative_path)
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            try:
                load_weights_only(io.BytesIO(data), f"{path} (item {index.fqn})")
            except ValueError as bad:
                return bad
    return ValueError(f"{ckpt}: checkpoint does not load ({type(inner).__name__}: {_first_line(inner)})")
