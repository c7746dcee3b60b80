"""Files that come from elsewhere stay data: checks run before anything unpickles or extracts.

A megatron-core checkpoint holds two pickles: torch DCP's `.metadata`, which torch reads with a
plain `pickle.load` (it may name any callable, and unpickling calls it), and megatron's
`common.pt`, which torch.load reads with `weights_only=True` (refused already, but with a
multi-line message). `check_checkpoint_pickles` unpickles `.metadata` with an allowlist of the
plain data classes DCP writes and nothing else, and try-loads `common.pt` weights-only, so a
planted payload fails with one line naming the file and the global it asked for, before
megatron or torch touch the directory.

Tar members with absolute paths or `..` components are refused by `safe_member_name`; shards
are read in memory, never extracted, but the name is still a sign of a hostile file.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath

# Modules whose *classes* DCP metadata is made of (dataclasses and enums: constructing them
# runs no user code).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                    ("builtins", "slice"), *(("pathlib", cls) for cls in ("Path", "PosixPath", "PurePosixPath",
                                                                          "WindowsPath", "PureWindowsPath"))}


class UnsafePickleError(ValueError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
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


def check_checkpoint_pickles(ckpt: str) -> None:
    """Refuse a checkpoint directory whose pickled files would run code when loaded."""
    import torch

    metadata = os.path.join(ckpt, ".metadata")
    if os.path.isfile(metadata):
        load_data_pickle(metadata)
    common = os.path.join(ckpt, "common.pt")
    if os.path.isfile(common):
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsafePickleError(f"{common}: refused by torch.load(weights_only=True): {first}") from None


def safe_member_name(name: str, archive: str) -> str:
    """A tar member's name if it stays inside the archive's directory, else ValueError."""
    normalized = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or posixpath.isabs(normalized) or normalized == ".." \
            or normalized.startswith("../") or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"{archive}: member '{name}' points outside the archive (absolute or '..' path)")
    return normalized
