"""Reading and writing Hugging Face (diffusers) model folders one tensor at a time.

A diffusers model folder holds ``config.json`` and either one
``diffusion_pytorch_model.safetensors`` or several shards named by
``diffusion_pytorch_model.safetensors.index.json``. :class:`SafetensorsFolder` opens such a
folder as a read-only mapping whose keys, shapes and dtypes come from the file headers alone;
a tensor is read from disk only when it is indexed, and nothing is cached, so a converter
that consumes keys one by one never holds the HF state dict. :class:`PlannedSafetensorsWriter`
is the other direction: the shard layout is computed from the planned keys, shapes and dtypes,
then each tensor is written to disk as it arrives (nothing buffered). :func:`atomic_output_dir`
gives every writer a temp folder that only becomes the requested path once everything in it
is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_apex.sizing import bounded_runs, tensor_nbytes
from megatron_apex.untrusted import link_escape

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Keys a stock diffusers class does not know, kept apart on request (see docs/conversion.md).
EXTRAS_NAME = "apex_extras.safetensors"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text, flag: str = "--max-shard-size") -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (decimal units, as diffusers)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"{flag} {text!r}: expected a size such as 5GB, 500MB or a byte count")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value < 1:
        raise ValueError(f"{flag} {text!r}: must be at least one byte")
    return value


def read_json(path: str, what: str) -> Dict:
    try:
        with open(path) as f:
            payload = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path}: not valid JSON ({err})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{what} {path}: expected a JSON object")
    return payload


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_file(folder: str, name: str, flag: str = "--hf-path") -> str:
    """``folder/name`` for reading, refused when it would lead outside ``folder`` (a name with
    `..`, a symbolic link out of it, a hard link: ``untrusted.link_escape``)."""
    path = os.path.join(folder, name)
    escape = link_escape(path, folder)
    if escape is not None:
        raise ValueError(f"{flag} {path}: {escape}; the files of an input folder are read only from inside it")
    return path


def read_config(folder: str, flag: str = "--hf-path") -> Dict:
    """``folder/config.json`` as a dict; errors name ``flag``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder}: no such directory")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            hint = " (this is a pipeline folder: pass its transformer/ subfolder)"
        raise FileNotFoundError(f"{flag} {folder}: no {CONFIG_NAME}{hint}")
    return read_json(input_file(folder, CONFIG_NAME, flag), f"{flag}")


def weight_files(folder: str, flag: str = "--hf-path") -> List[str]:
    """The safetensors files of a diffusers folder: the index's shards, or the single file."""
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        index = read_json(input_file(folder, INDEX_NAME, flag), flag)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{flag} {index_path}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if absent:
            raise FileNotFoundError(f"{flag} {folder}: {INDEX_NAME} names missing shard(s) {', '.join(absent)}")
        return files
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return [WEIGHTS_NAME]
    others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    hint = f" (found {', '.join(others)}: only safetensors are read; re-save with safe_serialization)" if others else ""
    raise FileNotFoundError(f"{flag} {folder}: neither {INDEX_NAME} nor {WEIGHTS_NAME}{hint}")


def read_safetensors_header(path: str, flag: str = "--hf-path") -> Tuple[int, Dict[str, Dict]]:
    """(offset of the data section, {key: {"dtype", "shape", "data_offsets"}}) of a
    safetensors file: an 8-byte little-endian header length, then the JSON header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise ValueError(f"{flag} {path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{flag} {path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{flag} {path}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data_start = 8 + length
    for key, info in header.items():
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            dtype_name = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{flag} {path}: malformed header entry for {key!r}") from None
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = _ST_DTYPES[dtype_name].itemsize if dtype_name in _ST_DTYPES else None
        if itemsize is not None and (stop - begin != numel * itemsize or data_start + stop > size):
            raise ValueError(f"{flag} {path}: {key!r} has {stop - begin} bytes for shape {list(shape)} "
                             f"{dtype_name} (file truncated or corrupt)")
    return data_start, header


class SafetensorsFolder(Mapping[str, torch.Tensor]):
    """Read-only, lazy ``{key: tensor}`` over a diffusers folder's safetensors files.

    Keys, shapes and dtypes come from the headers; ``folder[key]`` reads that one tensor
    with a plain file read into fresh memory the caller owns (no memory map: once the caller
    drops a tensor its memory is gone, and resident memory counts only what is held).
    ``extra_files`` present in the folder (e.g. the APEX side file) contribute their keys
    too. A key in two files is an error.
    """

    def __init__(self, folder: str, flag: str = "--hf-path", extra_files: Sequence[str] = (EXTRAS_NAME,)):
        self.folder = folder
        self.flag = flag
        files = weight_files(folder, flag)
        files += [f for f in extra_files if os.path.isfile(os.path.join(folder, f)) and f not in files]
        self._files: Dict[str, object] = {}
        self._entries: Dict[str, Tuple[str, int, Tuple[int, ...], str, int]] = {}
        for name in files:
            path = input_file(folder, name, flag)
            data_start, header = read_safetensors_header(path, flag)
            for key, info in header.items():
                if key in self._entries:
                    raise ValueError(f"{flag} {folder}: key {key!r} is in both {self._entries[key][0]} and {name}")
                begin, stop = (int(x) for x in info["data_offsets"])
                self._entries[key] = (name, data_start + begin, tuple(info["shape"]), info["dtype"], stop - begin)
        self.files = files

    # Mapping interface: reads happen only in __getitem__.
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._entries:
            raise KeyError(key)
        name, offset, shape, _, nbytes = self._entries[key]
        dtype = self.dtype(key)
        handle = self._files.get(name)
        if handle is None:
            handle = self._files[name] = open(os.path.join(self.folder, name), "rb")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        handle.seek(offset)
        if nbytes and handle.readinto(raw.numpy()) != nbytes:
            raise ValueError(f"{self.flag} {self.folder}/{name}: short read for {key!r}")
        return raw.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        name = self._entries[key][3]
        if name not in _ST_DTYPES:
            raise ValueError(f"{self.flag} {self.folder}: key {key!r} has unsupported dtype {name}")
        return _ST_DTYPES[name]

    def file_of(self, key: str) -> str:
        return self._entries[key][0]

    def dominant_dtype(self) -> Optional[torch.dtype]:
        """The dtype holding most elements (what an export should write back by default)."""
        counts: Dict[str, int] = {}
        for _, _, shape, name, _ in self._entries.values():
            n = 1
            for s in shape:
                n *= s
            counts[name] = counts.get(name, 0) + n
        if not counts:
            return None
        return _ST_DTYPES.get(max(counts, key=counts.get))

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shard_file_name(index: int, total: int, weights_name: str = WEIGHTS_NAME) -> str:
    """diffusers' / huggingface_hub's shard naming: ``<stem>-00001-of-00003.safetensors``."""
    stem, ext = os.path.splitext(weights_name)
    return f"{stem}-{index:05d}-of-{total:05d}{ext}"


_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


class PlannedSafetensorsWriter:
    """Writes safetensors shards whose layout is known before any data arrives, one tensor at
    a time straight to disk: nothing is buffered, so memory holds only the tensor being written,
    whatever ``max_shard_size`` is.

    ``plan`` lists (key, shape, dtype) in the order :meth:`add` will be called (an exporter gets
    it by running its own conversion on meta tensors). Shards are filled in that order up to
    ``max_shard_size`` bytes (a single larger tensor gets a shard of its own) and named as
    diffusers / huggingface_hub do; one shard in total is ``weights_name`` with no index. Each
    shard's header (keys, shapes, offsets) is written when its first tensor arrives.
    """

    def __init__(self, folder: str, plan: Sequence[Tuple[str, Sequence[int], torch.dtype]], max_shard_size: int,
                 weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME):
        self.folder, self.index_name = folder, index_name
        self._plan = [(key, tuple(int(s) for s in shape), dtype) for key, shape, dtype in plan]
        if len({key for key, _, _ in self._plan}) != len(self._plan):
            raise ValueError("a tensor key is planned twice")
        for key, _, dtype in self._plan:
            if dtype not in _ST_NAMES:
                raise ValueError(f"tensor {key!r}: dtype {dtype} has no safetensors name")
        shards = bounded_runs([tensor_nbytes(shape, dtype) for _, shape, dtype in self._plan], max_shard_size)
        self._shards = shards
        self._shard_of = [shard for shard, members in enumerate(shards) for _ in members]
        total = len(shards)
        self.names = [weights_name] if total == 1 else [shard_file_name(i + 1, total, weights_name)
                                                       for i in range(total)]
        self.total_size = sum(tensor_nbytes(shape, dtype) for _, shape, dtype in self._plan)
        self._next = 0  # index into the plan
        self._shard = -1
        self._file = None

    def _open_shard(self, shard: int) -> None:
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self._shards[shard]:
            key, shape, dtype = self._plan[i]
            nbytes = tensor_nbytes(shape, dtype)
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._file = open(os.path.join(self.folder, self.names[shard]), "wb")
        self._file.write(len(text).to_bytes(8, "little"))
        self._file.write(text)
        self._shard = shard

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise ValueError(f"tensor {key!r} was not planned (all {len(self._plan)} planned tensors are written)")
        want_key, want_shape, want_dtype = self._plan[self._next]
        if key != want_key or tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise ValueError(f"tensor {key!r} {list(tensor.shape)} {tensor.dtype} arrived where the plan has "
                             f"{want_key!r} {list(want_shape)} {want_dtype}")
        shard = self._shard_of[self._next]
        if shard != self._shard:
            self._close_shard()
            self._open_shard(shard)
        data = tensor.detach().contiguous()
        if data.numel():
            # little-endian bytes, as the format specifies (and every supported host is)
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> List[str]:
        """Check every planned tensor came, close the last shard, write the index; returns the
        file names."""
        if self._next != len(self._plan):
            self._close_shard()
            raise ValueError(f"{len(self._plan) - self._next} planned tensor(s) never arrived, the first "
                             f"{self._plan[self._next][0]!r}")
        self._close_shard()
        if not self._plan:
            return []
        if len(self.names) == 1:
            return list(self.names)
        weight_map = {self._plan[i][0]: name for name, members in zip(self.names, self._shards) for i in members}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.folder, self.index_name), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return self.names + [self.index_name]


def write_tensor_stream(folder: str, make_items: Callable[[bool], Iterator[Tuple[str, torch.Tensor, bool]]],
                        max_shard_size: int, separate_extras: bool) -> List[str]:
    """A diffusers folder's weights from a stream of (key, tensor, is APEX extra).

    ``make_items(meta)`` must yield the same keys, shapes and dtypes in the same order with
    ``meta`` True (meta-device tensors: the layout, computed before anything is read) and
    False (the data, written as it comes). Extras go to ``apex_extras.safetensors`` with
    ``separate_extras``, else into the shards. Returns the file names written.
    """
    plan = [(key, tuple(t.shape), t.dtype, extra) for key, t, extra in make_items(True)]
    side_keys = {key for key, _, _, extra in plan if extra and separate_extras}
    main = PlannedSafetensorsWriter(folder, [(k, s, d) for k, s, d, _ in plan if k not in side_keys], max_shard_size)
    side = PlannedSafetensorsWriter(folder, [(k, s, d) for k, s, d, _ in plan if k in side_keys], 1 << 62,
                                    weights_name=EXTRAS_NAME, index_name=EXTRAS_NAME + ".index.json")
    try:
        for key, tensor, _ in make_items(False):
            (side if key in side_keys else main).add(key, tensor)
            del tensor
        return main.close() + side.close()
    finally:
        main._close_shard()
        side._close_shard()


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
    """Make freed tensors of ``threshold`` bytes and more go back to the OS at once (glibc).

    glibc serves a large allocation with mmap and unmaps it on free, but after such a free it
    raises its (dynamic) mmap threshold to the freed block's size, so later tensors up to that
    size come from the heap, whose freed space it keeps. A streaming conversion, which frees
    every tensor it made, then shows an RSS that creeps up with the model (measured: +25 MB per
    GB of weights) although it holds a few tensors. A fixed threshold keeps RSS at what is
    alive. For the conversion tools (whole processes); False where there is no glibc."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # this process's own libc
    except OSError:
        return False
    if mallopt is None:
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def check_output_path(path: str, flag: str) -> None:
    """An output path must not exist yet (an empty directory is fine); checked before any work."""
    if os.path.isdir(path):
        if os.listdir(path):
            raise FileExistsError(f"{flag} {path}: exists and is not empty; choose a new path or remove it")
    elif os.path.exists(path):
        raise FileExistsError(f"{flag} {path}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: parent directory {parent} does not exist")


@contextlib.contextmanager
def atomic_output_dir(path: str, flag: str):
    """Yield a fresh temp directory beside ``path``; rename it to ``path`` on success, remove
    it on any error, so ``path`` is either complete or absent."""
    check_output_path(path, flag)
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(path):  # empty, checked above
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
