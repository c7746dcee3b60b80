"""Reader of `megatron_apex.latent_shards.v1` (megatron_apex/data/prepare/) for the Trainer.

Start-up builds the index of valid samples (shard, key, bucket, member offsets). A shard that
prepare_data gave an index (`shard-NNNNNN.idx.npy`, named with its sha256 in the manifest's shard
entry) is read from it: no tar header is read. The index is used when its sha256 and the tar's
size are the manifest's and every row is consistent (offsets inside the shard, sizes that hold
the shapes, grids among the buckets); otherwise, and for shards without one, the shard is
scanned: every tar header and the small headers of each sample's members (the .npy headers and
the json), never the payloads. A sample whose members are damaged (an unreadable .npy,
a payload shorter than its header says, a latent whose shape is not its bucket's, a missing
member, a symbolic or hard link member, which is never followed) is left out, counted in
`skipped` and named in one log line. Batches then read only their own samples' bytes
(`os.pread` at the recorded offsets), so a data-parallel rank reads only its slice. Gzipped
shards cannot be read at an offset: they are decompressed into memory once at start-up (fine
for small datasets; write plain tars for large ones).

Order (`BucketBatchSampler`): epoch e permutes each bucket's samples with a torch.Generator
seeded `seed + e`, cuts each into whole global batches (a bucket's tail that does not fill one
sits the epoch out; it changes from epoch to epoch) and shuffles the batches with the same
generator. So every global batch, and every micro-batch of it, has one latent shape, and the
order is a function of (seed, consumed_samples) alone: a resume yields exactly the batches of
an uninterrupted run.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from megatron_apex.data.latent_format import INDEX_COLUMNS, LATENT_FORMAT, MANIFEST_NAME
from megatron_apex.untrusted import safe_member_name

_REQUIRED = ("latent.npy", "ctx.npy", "mask.npy", "json")


def _manifest_path(data_path) -> Path:
    path = Path(data_path)
    return path if path.name == MANIFEST_NAME and path.is_file() else path / MANIFEST_NAME


def is_latent_dataset(data_path) -> bool:
    """Whether `data_path` (a folder or its manifest.json) holds latent_shards.v1."""
    if data_path is None:
        return False
    path = _manifest_path(data_path)
    try:
        return json.loads(path.read_text()).get("format") == LATENT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False  # not ours: the webdataset reader gives its own error


def read_latent_manifest(data_path) -> dict:
    path = _manifest_path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"--data-path {data_path}: no {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != LATENT_FORMAT:
        raise ValueError(f"{path}: format is not {LATENT_FORMAT!r}")
    for key in ("latent_channels", "context_dim", "max_text_len"):
        value = manifest.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
    buckets = manifest.get("buckets")
    if not (isinstance(buckets, list) and buckets and all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) and v >= 1 for v in b) for b in buckets)):
        raise ValueError(f"{path}: buckets must be a non-empty list of [height, width] latent sizes")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{path}: shards must be a list of shard entries")
    for i, shard in enumerate(shards):
        name = shard.get("name") if isinstance(shard, dict) else None
        # a bare file name: a manifest must not point outside its own folder
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"{path}: shards[{i}] needs a 'name' (a file name in the folder), got {name!r}")
    return manifest


_NPY_HEADERS: dict = {}


def _npy_header(head: bytes) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, payload offset) of an .npy member from its first bytes; ValueError if unreadable."""
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise ValueError("not an .npy array")
    start = 10 if head[6] == 1 else 12
    end = start + int.from_bytes(head[8:start], "little")
    if len(head) < end:
        raise ValueError("truncated .npy header")
    known = _NPY_HEADERS.get(head[:end])
    if known is not None:  # shards repeat a few headers: skip re-parsing them
        return known
    try:
        # the header is a Python dict literal; literal_eval evaluates no code
        info = ast.literal_eval(head[start:end].decode("latin1"))
        dtype = np.dtype(info["descr"])
        shape = tuple(int(v) for v in info["shape"])
    except Exception as exc:  # SyntaxError, KeyError, TypeError... of a damaged header
        raise ValueError(f"unreadable .npy header ({type(exc).__name__})") from None
    if dtype.hasobject or info.get("fortran_order"):
        raise ValueError("not a plain C-ordered array")
    if len(_NPY_HEADERS) < 4096:
        _NPY_HEADERS[head[:end]] = (dtype, shape, end)
    return dtype, shape, end


class _Shard:
    """Reads byte ranges of one shard: pread on a plain tar, memory for a gzipped one."""

    def __init__(self, path: Path):
        self.path = path
        self.blob: Optional[bytes] = None
        self.fd: Optional[int] = None
        if path.name.endswith((".gz", ".tgz")):
            with gzip.open(path, "rb") as f:
                self.blob = f.read()
        self.size = len(self.blob) if self.blob is not None else path.stat().st_size

    def read(self, offset: int, size: int) -> bytes:
        if self.blob is not None:
            return self.blob[offset:offset + size]
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self.fd, size, offset)

    def members(self):
        fileobj = io.BytesIO(self.blob) if self.blob is not None else None
        with tarfile.open(self.path if fileobj is None else None, mode="r:", fileobj=fileobj) as tar:
            while True:
                member = tar.next()
                if member is None:
                    return
                yield member

    def __getstate__(self):  # an open descriptor does not travel to another process
        return dict(self.__dict__, fd=None)


class LatentShardDataset:
    """`get_batch(indices)` -> {image (B, C, h, w) float32, context (B, L, D) float32,
    context_mask (B, L) bool, label (B,) -1, caption [str]} with L = the manifest's max_text_len;
    all indices must share one bucket (the sampler's batches do)."""

    def __init__(self, data_path, log: Callable[[str], None] = print):
        self.data_path = Path(data_path)
        self.manifest = read_latent_manifest(data_path)
        self.root = _manifest_path(data_path).parent
        self.channels = self.manifest["latent_channels"]
        self.context_dim = self.manifest["context_dim"]
        self.max_text_len = self.manifest["max_text_len"]
        self.allowed = {tuple(b) for b in self.manifest["buckets"]}
        self.skipped = 0
        self.bad_members: list[str] = []
        self._log = log
        self.shards: list[Optional[_Shard]] = []
        shard_of, grid_of, offsets, keys = [], [], [], []
        self.indexed_shards = 0  # shards read from their index, without a header scan
        for s, entry in enumerate(self.manifest["shards"]):
            path = self.root / entry["name"]
            for key, grid, offs in self._samples(path, entry):
                shard_of.append(s)
                grid_of.append(grid)
                offsets.append(offs)
                keys.append(key)
        if not keys:
            raise ValueError(f"--data-path {data_path}: no valid sample in its {len(self.manifest['shards'])} "
                             f"shards ({self.skipped} damaged samples or shards skipped)")
        self.keys = keys
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.grids = sorted(set(grid_of))
        grid_id = {g: i for i, g in enumerate(self.grids)}
        self.bucket_of = np.asarray([grid_id[g] for g in grid_of], dtype=np.int64)
        # (N, fields, 2): payload offset and size of latent, ctx, mask, txt (size 0 = absent)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    # ---- the index -----------------------------------------------------------------------
    def _samples(self, path: Path, entry: dict):
        """(key, grid, offsets) of each valid sample of one shard: from its index when usable."""
        shard = self._open(path)
        if shard is None:
            return
        rows = self._index_rows(shard, entry)
        if rows is None:
            yield from self._scan(path, shard)
            return
        self.indexed_shards += 1
        for row in rows.tolist():
            key, offs, grid = row[0], row[1:12], (row[12], row[13])
            pairs = [(offs[i], offs[i + 1]) for i in range(0, 8, 2)] + [(offs[8], offs[9]), (offs[10], 0)]
            yield f"{key:08d}", grid, pairs

    def _index_rows(self, shard: _Shard, entry: dict) -> Optional[np.ndarray]:
        """The shard's index rows (latent_format.INDEX_COLUMNS), or None to scan it (no index, or one
        that does not fit the shard: the log says why)."""
        recorded = entry.get("sample_index")
        if not isinstance(recorded, dict):
            return None
        path = shard.path
        name = recorded.get("name")
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            return self._index_unusable(path, f"index name {name!r} is not a file name in the folder")
        index_path = self.root / name
        try:
            blob = index_path.read_bytes()
        except OSError as exc:
            return self._index_unusable(path, f"{name} unreadable ({type(exc).__name__})")
        if hashlib.sha256(blob).hexdigest() != recorded.get("sha256"):
            return self._index_unusable(path, f"{name} is not the index the manifest names (sha256 differs)")
        if path.stat().st_size != entry.get("bytes"):
            return self._index_unusable(path, f"the shard has {path.stat().st_size} bytes, the manifest says "
                                              f"{entry.get('bytes')}")
        try:
            rows = np.load(io.BytesIO(blob), allow_pickle=False)
        except Exception as exc:  # ValueError, EOFError... of a damaged .npy
            return self._index_unusable(path, f"{name} is not a readable .npy ({type(exc).__name__})")
        problem = self._index_problem(rows, shard.size)
        return self._index_unusable(path, f"{name}: {problem}") if problem else rows

    def _index_problem(self, rows: np.ndarray, size: int) -> Optional[str]:
        if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != len(INDEX_COLUMNS):
            return f"{rows.dtype} {rows.shape}, expected int64 (samples, {len(INDEX_COLUMNS)})"
        if not len(rows):
            return None
        col = {name: rows[:, i] for i, name in enumerate(INDEX_COLUMNS)}
        for field in ("latent", "ctx", "mask", "txt"):
            off, n = col[f"{field}_offset"], col[f"{field}_size"]
            if (off < 0).any() or (n < 0).any() or (off + n > size).any():
                return f"{field} offsets outside the shard"
        if not np.isin(col["latent_itemsize"], (2, 4)).all() or not np.isin(col["ctx_itemsize"], (2, 4)).all():
            return "itemsizes other than float16/32"
        tokens = col["tokens"]
        if (tokens < 0).any() or (tokens > self.max_text_len).any():
            return f"text lengths outside 0..{self.max_text_len}"
        if ((col["ctx_size"] != tokens * self.context_dim * col["ctx_itemsize"]).any()
                or (col["mask_size"] != tokens).any()):
            return "text sizes that do not hold their token counts"
        grids = set(zip(col["grid_h"].tolist(), col["grid_w"].tolist()))
        if not grids <= self.allowed:
            return f"latent grids {sorted(grids - self.allowed)} not among the manifest's buckets"
        if (col["latent_size"] != self.channels * col["grid_h"] * col["grid_w"] * col["latent_itemsize"]).any():
            return "latent sizes that do not hold their grids"
        return None

    def _index_unusable(self, path: Path, reason: str) -> None:
        self._log(f"[megatron_apex] data: {path}: index not used ({reason}); scanning the shard's headers")
        return None

    # ---- the scan ------------------------------------------------------------------------
    def _skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        self.bad_members.append(f"{where}: {reason}")
        self._log(f"[megatron_apex] data: skipped {where}: {reason}")

    def _open(self, path: Path) -> Optional[_Shard]:
        """The shard as self.shards[s] (None, counted and logged, when missing or unreadable)."""
        self.shards.append(None)  # index s of the manifest's shard list
        if not path.is_file():
            self._skip(str(path), "shard file missing")
            return None
        try:
            self.shards[-1] = _Shard(path)
        except (OSError, EOFError) as exc:
            self._skip(str(path), f"unreadable shard ({type(exc).__name__})")
        return self.shards[-1]

    def _scan(self, path: Path, shard: _Shard):
        groups: dict[str, dict] = {}
        order: list[str] = []
        links: dict[str, list[str]] = {}  # key -> its link members, which leave the sample out
        try:
            for m in shard.members():
                is_link = m.issym() or m.islnk()
                if not (m.isfile() or is_link):
                    continue
                try:
                    name = safe_member_name(m.name, str(path))
                except ValueError:
                    self._skip(f"{path}:{m.name}", "member name points outside the archive")
                    continue
                key, _, suffix = os.path.basename(name).partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if is_link:
                    kind = "symbolic" if m.issym() else "hard"
                    links.setdefault(key, []).append(f"member {m.name} is a {kind} link to {m.linkname}")
                    continue
                if m.offset_data + m.size > shard.size:  # a truncated file: tarfile seeks past the end
                    self._skip(f"{path}:{key}", f"member {suffix} runs past the end of the shard (truncated file)")
                    groups.pop(key, None)
                    if key in order:
                        order.remove(key)
                    break
                groups[key][suffix] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            self._skip(str(path), f"damaged tar after {len(order)} samples ({type(exc).__name__}); "
                                  "the samples before the damage are kept")
        for key in order:
            where = f"{path}:{key}"
            if key in links:
                self._skip(where, "; ".join(links[key]) + " (links are never followed)")
                continue
            try:
                grid, offs = self._check_sample(shard, groups[key])
            except ValueError as exc:
                self._skip(where, str(exc))
                continue
            yield key, grid, offs

    def _check_sample(self, shard: _Shard, members: dict):
        for field in _REQUIRED:
            if field not in members:
                raise ValueError(f"missing member {field}")
        off, size = members["json"]
        try:
            info = json.loads(shard.read(off, size))
            latent_size = tuple(int(v) for v in info["latent_size"])
        except Exception:  # JSON, key or type errors of a damaged member
            raise ValueError("json member unreadable or without latent_size") from None
        shapes = {}
        for field in ("latent.npy", "ctx.npy", "mask.npy"):
            off, size = members[field]
            head = shard.read(off, min(size, 4096))
            try:
                dtype, shape, start = _npy_header(head)
            except ValueError as exc:
                raise ValueError(f"{field}: {exc}") from None
            if start + int(np.prod(shape)) * dtype.itemsize != size:
                raise ValueError(f"{field}: payload of {size - start} bytes does not hold {dtype} {shape}")
            shapes[field] = (dtype, shape, off + start)
        for field, (dtype, _, _) in shapes.items():
            if dtype.str not in ("<f2", "<f4", "|b1"):
                raise ValueError(f"{field}: dtype {dtype.str} (expected little-endian float16/32 or bool)")
        dtype, shape, _ = shapes["latent.npy"]
        if dtype.kind != "f" or len(shape) != 3 or shape[0] != self.channels:
            raise ValueError(f"latent.npy is {dtype} {shape}, expected float ({self.channels}, h, w)")
        if shape[1:] != latent_size or latent_size not in self.allowed:
            raise ValueError(f"latent.npy shape {shape} does not match its bucket {list(latent_size)} "
                             f"(manifest buckets {sorted(self.allowed)})")
        dtype, cshape, _ = shapes["ctx.npy"]
        if dtype.kind != "f" or len(cshape) != 2 or cshape[1] != self.context_dim or cshape[0] > self.max_text_len:
            raise ValueError(f"ctx.npy is {dtype} {cshape}, expected float (<= {self.max_text_len}, "
                             f"{self.context_dim})")
        dtype, mshape, _ = shapes["mask.npy"]
        if dtype != np.bool_ or mshape != (cshape[0],):
            raise ValueError(f"mask.npy is {dtype} {mshape}, expected bool ({cshape[0]},)")
        # (payload offset, payload size) of latent, ctx, mask; txt; itemsizes; real tokens
        offs = [(start, members[f][0] + members[f][1] - start) for f, (_, _, start) in shapes.items()]
        offs.append(members.get("txt", (0, 0)))
        offs.append((shapes["latent.npy"][0].itemsize, shapes["ctx.npy"][0].itemsize))
        offs.append((cshape[0], 0))
        return tuple(int(v) for v in shape[1:]), offs

    # ---- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def sample_shape(self, index: int) -> tuple[int, int, int]:
        return (self.channels, *self.grids[int(self.bucket_of[int(index)])])

    def _shard(self, index: int) -> _Shard:
        return self.shards[int(self.shard_of[index])]

    def get_batch(self, indices) -> dict:
        idx = [int(i) for i in indices]
        shapes = {self.sample_shape(i) for i in idx}
        if len(shapes) != 1:
            raise ValueError(f"a batch spans several latent shapes {sorted(shapes)}; batches must come from "
                             "one bucket (use batch_sampler)")
        (shape,) = shapes
        b, L, D = len(idx), self.max_text_len, self.context_dim
        image = np.empty((b, *shape), dtype=np.float32)
        context = np.zeros((b, L, D), dtype=np.float32)
        mask = np.zeros((b, L), dtype=bool)
        captions = []
        for row, i in enumerate(idx):
            shard, offs = self._shard(i), self.offsets[i].tolist()
            (lat, lat_n), (ctx, ctx_n), (msk, msk_n), (txt, txt_n), (lat_size, ctx_size), (n, _) = offs
            image[row] = np.frombuffer(shard.read(lat, lat_n), dtype=f"<f{lat_size}").reshape(shape)
            context[row, :n] = np.frombuffer(shard.read(ctx, ctx_n), dtype=f"<f{ctx_size}").reshape(n, D)
            mask[row, :n] = np.frombuffer(shard.read(msk, msk_n), dtype=np.bool_)
            captions.append(shard.read(txt, txt_n).decode("utf-8", "replace") if txt_n else "")
        return dict(image=torch.from_numpy(image), context=torch.from_numpy(context),
                    context_mask=torch.from_numpy(mask), label=torch.full((b,), -1, dtype=torch.long),
                    caption=captions)

    def batch_sampler(self, global_batch_size: int, seed: int, consumed_samples: int = 0) -> "BucketBatchSampler":
        return BucketBatchSampler(self.bucket_of, global_batch_size, seed, consumed_samples,
                                  where=f"--data-path {self.data_path}")


def check_model_fits_data(manifest: dict, model_config, data_path, model_name: str) -> None:
    """Latent channels, text width and bucket sides against the model: one line naming both flags."""
    problems = []
    if manifest["latent_channels"] != model_config.latent_channels:
        problems.append(f"latent channels {manifest['latent_channels']} vs the model's {model_config.latent_channels}")
    if manifest["context_dim"] != model_config.context_dim:
        problems.append(f"text states width {manifest['context_dim']} vs the model's {model_config.context_dim}")
    p = model_config.patch_size
    bad = [b for b in manifest.get("used_buckets", manifest["buckets"]) if b[0] % p or b[1] % p]
    if bad:
        problems.append(f"latent buckets {bad} not multiples of the patch size {p}")
    if problems:
        raise ValueError(f"--data-path {data_path} does not fit --model {model_name}: {'; '.join(problems)}")


class BucketBatchSampler:
    """Infinite iterator over bucket-homogeneous global batches; see the module docstring."""

    def __init__(self, bucket_of, global_batch_size: int, seed: int, consumed_samples: int = 0, where: str = "data"):
        bucket_of = np.asarray(bucket_of, dtype=np.int64)
        if global_batch_size < 1:
            raise ValueError(f"--global-batch-size must be >= 1, got {global_batch_size}")
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of --global-batch-size "
                             f"{global_batch_size} ({where}: bucketed batches cannot resume mid-batch; keep the "
                             "global batch size of the run being resumed)")
        self.members = [np.flatnonzero(bucket_of == b) for b in np.unique(bucket_of)]
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.batches_per_epoch = sum(len(m) // global_batch_size for m in self.members)
        if self.batches_per_epoch == 0:
            largest = max((len(m) for m in self.members), default=0)
            raise ValueError(f"--global-batch-size {global_batch_size} is larger than every aspect-ratio bucket of "
                             f"{where} (the largest holds {largest} samples)")
        self._cached: tuple[int, list] = (-1, [])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached[0] != epoch:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            G = self.global_batch_size
            batches = []
            for members in self.members:
                order = members[torch.randperm(len(members), generator=g).numpy()]
                batches.extend(order[k * G:(k + 1) * G].tolist() for k in range(len(members) // G))
            shuffle = torch.randperm(len(batches), generator=g).tolist()
            self._cached = (epoch, [batches[i] for i in shuffle])
        return self._cached[1]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch, j = divmod(self.consumed_samples // self.global_batch_size, self.batches_per_epoch)
            batch = self.epoch_batches(epoch)[j]
            self.consumed_samples += len(batch)
            yield batch
