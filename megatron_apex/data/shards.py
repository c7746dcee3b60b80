"""WebDataset shards of (image, text states, mask, caption, label) and their in-memory reader.

Layout of a dataset folder: `manifest.json` + `<split>-NNNNNN.tar.gz` shards. Per sample
(webdataset key `NNNNNNN`): `image.npy` (uint8 pixels (C, H, W), or float latents) or `png`,
`ctx.npy` (float16 text states (n, D), n <= max_text_len), `mask.npy` (bool (n,)),
`txt` (caption), `cls` (label, optional). The reader pads states to the manifest's
`max_text_len` with zeros / mask False, so writers may store only the real tokens.

Within a shard, samples are stored grouped by caption: repeated caption states then sit
next to each other and gzip's 32 KiB window removes the repeats (the built-in train split:
~720 MB as plain tar, 35 MB gzipped). Sample order inside shards does not matter for
training: the global batch sampler permutes indices over the whole in-memory dataset.

A symbolic or hard link member of a shard is never followed: the sample it belongs to is left
out, and each shard's link members are named in one log line (`ShardDataset.link_members`).

Reading 60k samples through tarfile costs ~13 s (pure-Python tar parsing, 5 members per
sample), so the first read of a split is memoised as one torch file keyed by the manifest's
content hash (`<cache>/memo/`); later loads take well under a second.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

SHARD_FORMAT = "megatron_apex.shards.v1"
MANIFEST_NAME = "manifest.json"


# ----------------------------------------------------------------------------------- writing

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    if image.ndim == 3:  # (C, H, W) -> PIL layout
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(sample: dict, image_format: str = "npy") -> dict:
    """{key, image, context, mask?, caption, label?} -> webdataset sample of bytes.

    uint8 images go to `image.npy` (decodes faster than PNG, same size once gzipped) or, with
    image_format="png", to `png`; float images (latents) always to `image.npy`.
    """
    image = np.asarray(sample["image"])
    context = np.asarray(sample["context"], dtype=np.float16)
    if context.ndim != 2:
        raise ValueError(f"sample {sample['key']}: context must be (tokens, dim), got {context.shape}")
    mask = np.asarray(sample.get("mask", np.ones(len(context), dtype=bool)), dtype=bool)
    if mask.shape != (len(context),):
        raise ValueError(f"sample {sample['key']}: mask shape {mask.shape} != ({len(context)},)")
    out = {"__key__": sample["key"], "ctx.npy": _npy_bytes(context), "mask.npy": _npy_bytes(mask),
           "txt": str(sample.get("caption", "")).encode("utf-8")}
    if image.dtype == np.uint8 and image_format == "png":
        out["png"] = _png_bytes(image)
    elif image.dtype == np.uint8 and image.ndim == 2:
        out["image.npy"] = _npy_bytes(image[None])
    else:
        out["image.npy"] = _npy_bytes(image)
    if sample.get("label") is not None:
        out["cls"] = str(int(sample["label"])).encode()
    return out


def _write_shard(path: Path, samples: list[dict], compress: bool, image_format: str) -> dict:
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        # mtime=0 and no file name in the gzip header: identical content -> identical bytes,
        # so the manifest's content hash is reproducible.
        stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) \
            if compress else raw
        with wds.TarWriter(stream, compress=False, encoder=False, mtime=0) as writer:
            for s in samples:
                writer.write(encode_sample(s, image_format))
        if compress:
            stream.close()
    os.replace(tmp, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(name=path.name, count=len(samples), sha256=digest, bytes=path.stat().st_size)


def write_split(out_dir, split: str, samples: Iterable[dict], samples_per_shard: int,
                group_key: Callable[[dict], object] | None = None, compress: bool = True,
                image_format: str = "npy") -> dict:
    """Write `samples` as `<split>-NNNNNN.tar[.gz]` shards; return the manifest entry of the split."""
    if image_format not in ("npy", "png"):
        raise ValueError(f"image_format must be 'npy' or 'png', got {image_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, chunk = [], []

    def flush():
        if group_key is not None:
            chunk.sort(key=group_key)  # stable: original order within a group
        ext = ".tar.gz" if compress else ".tar"
        shards.append(_write_shard(out_dir / f"{split}-{len(shards):06d}{ext}", chunk, compress,
                                   image_format))
        chunk.clear()

    for s in samples:
        chunk.append(s)
        if len(chunk) == samples_per_shard:
            flush()
    if chunk:
        flush()
    return dict(count=sum(s["count"] for s in shards), shards=shards)


def write_manifest(out_dir, manifest: dict) -> Path:
    """Add the content hash (over every shard's sha256, in order) and write atomically."""
    manifest = dict(manifest)
    h = hashlib.sha256()
    for split in sorted(manifest["splits"]):
        for s in manifest["splits"][split]["shards"]:
            h.update(f"{split}/{s['name']}:{s['sha256']}\n".encode())
    manifest["content_hash"] = h.hexdigest()
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- reading

def read_manifest(data_path) -> dict:
    data_path = Path(data_path)
    if data_path.is_file() and data_path.name == MANIFEST_NAME:
        data_path = data_path.parent
    if not data_path.is_dir():
        raise FileNotFoundError(f"--data-path {data_path} is not a directory of shards")
    path = data_path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in --data-path {data_path} "
                                "(write shards with megatron_apex.data.shards.write_split/write_manifest)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    _check_manifest(manifest, path)
    return manifest


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_manifest(manifest, path: Path) -> None:
    """The manifest's structure, checked once so that a bad one fails naming the key."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    found = manifest.get("format", SHARD_FORMAT)
    if found != SHARD_FORMAT:
        raise ValueError(f"{path}: format {found!r}, expected {SHARD_FORMAT!r} (shards written by "
                         "megatron_apex.data.shards)")
    for key in ("splits", "max_text_len", "context_dim"):
        if key not in manifest:
            raise ValueError(f"{path} lacks the key {key!r}")
    for key in ("max_text_len", "context_dim"):
        if not _is_positive_int(manifest[key]):
            raise ValueError(f"{path}: {key} must be a positive integer, got {manifest[key]!r}")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: splits must map split names to their shards, got {type(splits).__name__}")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"{path}: split {split!r} needs a list 'shards' of shard entries, got "
                             f"{type(shards).__name__}")
        for i, shard in enumerate(shards):
            name = shard.get("name") if isinstance(shard, dict) else None
            # a bare file name: a manifest must not point outside its own folder
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                raise ValueError(f"{path}: split {split!r} shards[{i}] needs a 'name' (a file name in the "
                                 f"folder), got {name!r}")
            for key in ("count", "bytes"):
                if key in shard and not (isinstance(shard[key], int) and not isinstance(shard[key], bool)
                                         and shard[key] >= 0):
                    raise ValueError(f"{path}: split {split!r} shard {name} has {key} {shard[key]!r}, expected a "
                                     "non-negative integer")


_NPY_HEADERS: dict[bytes, tuple] = {}


def _load_npy(data: bytes, where: str, member: str) -> np.ndarray:
    """np.load without re-parsing the (identical) header of every small array; never unpickles."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError(f"{where}: {member} is not an .npy array")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    info = _NPY_HEADERS.get(data[:end])
    try:
        if info is None:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if not arr.flags.c_contiguous or arr.dtype.hasobject:
                return arr
            _NPY_HEADERS[data[:end]] = info = (arr.dtype, arr.shape)
        dtype, shape = info
        return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=end).reshape(shape)
    except Exception as exc:  # numpy raises ValueError, EOFError, SyntaxError... for damaged payloads
        if "allow_pickle" in str(exc):
            raise ValueError(f"{where}: {member} holds a pickled object array, refused (shard arrays are read "
                             "without unpickling)") from None
        raise ValueError(f"{where}: {member} is not a readable .npy array ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    # webdataset appends the stream and URL to an exception's args, and the first arg to " @ <stream>"
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    text = text.split(" @ ")[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _decode_image(sample: dict, where: str) -> np.ndarray:
    if "png" in sample:
        from PIL import Image

        try:
            img = np.asarray(Image.open(io.BytesIO(sample["png"])))
        except Exception as exc:  # PIL's UnidentifiedImageError, OSError for truncated data
            raise ValueError(f"{where}: png is not a readable PNG ({_first_line(exc)})") from None
        return img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    if "image.npy" in sample:
        image = _load_npy(sample["image.npy"], where, "image.npy")
        if image.ndim != 3 or not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
            raise ValueError(f"{where}: image.npy must be uint8 pixels or float latents of shape (C, H, W), got "
                             f"{image.dtype} {image.shape}")
        return image
    raise ValueError(f"{where}: sample has neither 'png' nor 'image.npy' (keys {sorted(sample)})")


def _decode_sample(s: dict, where: str) -> dict:
    if "ctx.npy" not in s:
        raise ValueError(f"{where}: missing 'ctx.npy' (keys {sorted(s)})")
    ctx = _load_npy(s["ctx.npy"], where, "ctx.npy")
    if ctx.ndim != 2 or not np.issubdtype(ctx.dtype, np.floating):
        raise ValueError(f"{where}: ctx.npy must be float text states (tokens, dim), got {ctx.dtype} {ctx.shape}")
    if "mask.npy" in s:
        mask = _load_npy(s["mask.npy"], where, "mask.npy")
        if mask.shape != (len(ctx),) or not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
            raise ValueError(f"{where}: mask.npy must be a bool array of shape ({len(ctx)},) like ctx.npy's "
                             f"tokens, got {mask.dtype} {mask.shape}")
        mask = mask.astype(bool)
    else:
        mask = np.ones(len(ctx), dtype=bool)
    try:
        caption = s.get("txt", b"").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: txt is not UTF-8 text") from None
    try:
        label = int(s["cls"]) if "cls" in s else -1
    except ValueError:
        raise ValueError(f"{where}: cls {s['cls'][:20]!r} is not an integer label") from None
    return dict(key=s["__key__"], image=_decode_image(s, where), context=ctx, mask=mask, caption=caption,
                label=label)


_WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members, which it skips


def _regular_files(stream, archive: str, links: list) -> Iterable[dict]:
    """{fname, data, __url__} of each regular member, as webdataset's tar_file_iterator yields
    them (which drops link members without a word); every member's name must stay inside the
    archive. A symbolic or hard link member is never read: it goes to `links`."""
    from megatron_apex.untrusted import safe_member_name

    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            safe_member_name(m.name, archive)
            if m.issym() or m.islnk():
                links.append(m)
            elif m.isreg() and not _WDS_META.match(m.name):
                yield dict(fname=m.name, data=tar.extractfile(m).read(), __url__=archive)
            tar.members = []  # read as a stream: keep no index of the (many, small) members


def _read_shard(path: Path) -> tuple[list[dict], list[str], int]:
    """(decoded samples, the shard's link members, how many samples they left out)."""
    from webdataset.tariterators import base_plus_ext, group_by_keys

    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"shard is empty (0 bytes): {path}")
    links: list[tarfile.TarInfo] = []
    try:
        with open(path, "rb") as f:
            raw = list(group_by_keys(_regular_files(f, str(path), links)))
        # a sample with a link member is left out whole: the link may stand for any of its parts
        linked = {base_plus_ext(m.name)[0] for m in links}
        kept = [s for s in raw if s["__key__"] not in linked]
        out = [_decode_sample(s, f"shard {path}, sample {s.get('__key__')}") for s in kept]
    except (ValueError, FileNotFoundError) as exc:
        if str(path) in _first_line(exc):
            raise ValueError(_first_line(exc)) from None
        raise ValueError(f"corrupt shard {path}: {_first_line(exc)}") from None
    except Exception as exc:  # tarfile/gzip/zlib/EOF errors of a damaged file
        raise ValueError(f"corrupt shard {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    if not raw and not links:
        raise ValueError(f"corrupt shard {path}: no samples in it (an empty or zeroed tar archive)")
    named = [f"{m.name} ({'symbolic' if m.issym() else 'hard'} link to {m.linkname})" for m in links]
    return out, named, len(raw) - len(kept)


def _log_links(log: Callable[[str], None], path, links: list[str], left_out: int) -> None:
    log(f"[megatron_apex] data: {path}: {len(links)} link members not followed, {left_out} samples left "
        f"out: {', '.join(links)}")


def read_shard(path, log: Callable[[str], None] = print) -> list[dict]:
    """Decode every sample of one shard (webdataset's grouping of members into samples); samples
    with link members are left out, and named in one `log` line."""
    out, links, left_out = _read_shard(Path(path))
    if links:
        _log_links(log, path, links, left_out)
    return out


def check_samples_fit(samples: list[dict], manifest: dict, shard, reference: dict | None = None) -> dict | None:
    """Every sample's text states fit the manifest's (max_text_len, context_dim), and every
    image has the shape and dtype of the first one seen (or the manifest's `image_shape`), so
    stacking the split cannot fail later without a name. Returns the reference for the next
    shard: {"shape", "dtype", "where"}."""
    max_len, dim = int(manifest["max_text_len"]), int(manifest["context_dim"])
    if reference is None and manifest.get("image_shape") is not None:
        reference = dict(shape=tuple(manifest["image_shape"]), dtype=None, where=f"{MANIFEST_NAME} image_shape")
    for s in samples:
        where = f"shard {shard}, sample {s['key']}"
        ctx, image = s["context"], s["image"]
        if ctx.shape[1] != dim:
            raise ValueError(f"{where}: ctx.npy has width {ctx.shape[1]}, {MANIFEST_NAME} context_dim is {dim}")
        if len(ctx) > max_len:
            raise ValueError(f"{where}: ctx.npy has {len(ctx)} tokens, more than {MANIFEST_NAME} max_text_len "
                             f"{max_len}")
        if reference is None:
            reference = dict(shape=image.shape, dtype=image.dtype, where=where)
            continue
        if image.shape != reference["shape"]:
            raise ValueError(f"{where}: image has shape {tuple(image.shape)}, but {reference['where']} is "
                             f"{tuple(reference['shape'])}")
        if reference["dtype"] is None:  # the manifest gives no dtype: the first sample sets it
            reference = dict(reference, dtype=image.dtype, where=where)
        elif image.dtype != reference["dtype"]:
            raise ValueError(f"{where}: image is {image.dtype}, but {reference['where']} is {reference['dtype']}")
    return reference


class ShardDataset:
    """All samples of one split in memory; identical caption states are stored once."""

    def __init__(self, images: torch.Tensor, context_table: torch.Tensor, mask_table: torch.Tensor,
                 context_index: torch.Tensor, labels: torch.Tensor, captions: list[str],
                 manifest: dict | None = None, split: str | None = None, keys: list[str] | None = None):
        self.images = images                # (N, C, H, W) uint8 (pixels) or float (latents)
        self.context_table = context_table  # (U, L, D) float16, U unique caption states
        self.mask_table = mask_table        # (U, L) bool
        self.context_index = context_index  # (N,) long into the tables
        self.labels = labels                # (N,) long, -1 when unlabelled
        self.captions = captions
        self.keys = keys                    # webdataset sample keys (the builtin: source index)
        self.manifest = manifest or {}
        self.split = split
        self.link_members: list[str] = []  # "SHARD:MEMBER (KIND link to TARGET)", never followed

    @classmethod
    def from_samples(cls, samples: list[dict], max_text_len: int, context_dim: int,
                     manifest: dict | None = None, split: str | None = None) -> "ShardDataset":
        rows: dict[bytes, int] = {}
        table, masks, index = [], [], []
        for s in samples:
            ctx, mask = s["context"], s["mask"]
            if ctx.ndim != 2 or ctx.shape[1] != context_dim or len(ctx) > max_text_len:
                raise ValueError(f"sample {s['key']}: text states of shape {ctx.shape} do not fit "
                                 f"(<= {max_text_len}, {context_dim}) from the manifest")
            key = hashlib.sha1(ctx.astype(np.float16).tobytes() + mask.tobytes()).digest()
            if key not in rows:
                rows[key] = len(table)
                padded = np.zeros((max_text_len, context_dim), dtype=np.float16)
                padded[: len(ctx)] = ctx
                pmask = np.zeros(max_text_len, dtype=bool)
                pmask[: len(mask)] = mask
                table.append(padded)
                masks.append(pmask)
            index.append(rows[key])
        images = np.stack([s["image"] for s in samples])
        return cls(images=torch.from_numpy(images),
                   context_table=torch.from_numpy(np.stack(table)),
                   mask_table=torch.from_numpy(np.stack(masks)),
                   context_index=torch.tensor(index, dtype=torch.long),
                   labels=torch.tensor([s["label"] for s in samples], dtype=torch.long),
                   captions=[s["caption"] for s in samples], manifest=manifest, split=split,
                   keys=[s["key"] for s in samples])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    def get_batch(self, indices) -> dict:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        images = self.images[idx]
        images = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        rows = self.context_index[idx]
        return dict(image=images, context=self.context_table[rows].float(),
                    context_mask=self.mask_table[rows].clone(), label=self.labels[idx].clone(),
                    caption=[self.captions[i] for i in idx.tolist()])


_MEMO_FIELDS = ("images", "context_table", "mask_table", "context_index", "labels", "captions", "keys")


def _memo_path(manifest: dict, split: str, cache_dir) -> Path | None:
    if not manifest.get("content_hash"):
        return None
    from .builtin import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "memo" / f"{manifest['content_hash'][:24]}-{split}.pt"


def _read_memo(path: Path | None, manifest: dict, split: str) -> ShardDataset | None:
    if path is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob.get("content_hash") != manifest["content_hash"]:
            return None
        return ShardDataset(**{k: blob[k] for k in _MEMO_FIELDS}, manifest=manifest, split=split)
    except Exception:  # a damaged memo is only a lost shortcut: re-read the shards
        return None


def _write_memo(path: Path | None, ds: ShardDataset) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        torch.save({**{k: getattr(ds, k) for k in _MEMO_FIELDS},
                    "content_hash": ds.manifest["content_hash"]}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only cache: loading still works, just slower next time


def load_dataset(data_path=None, split: str = "train", cache_dir=None, name: str | None = None,
                 max_text_len: int = 16, memo: bool = True, log: Callable[[str], None] = print) -> ShardDataset:
    """`data_path=None`: the built-in dataset (built on first use); else a folder with a manifest.

    Every shard must exist with the size the manifest records; its samples are decoded through
    webdataset on the first load, and (memo=True) from the content-hash-keyed memo afterwards.
    Samples with link members are left out, and each shard's link members named in one `log`
    line; such a split is never memoised, so every load names them again.
    """
    if data_path is None:
        from .builtin import build_builtin_shards

        data_path = build_builtin_shards(cache_dir=cache_dir, name=name, max_text_len=max_text_len)
    data_path = Path(data_path)
    if data_path.is_file() and data_path.name == MANIFEST_NAME:
        data_path = data_path.parent
    manifest = read_manifest(data_path)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {data_path / MANIFEST_NAME} "
                         f"(has {sorted(manifest['splits'])})")
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise ValueError(f"split {split!r} of {data_path / MANIFEST_NAME} has no samples (its shard list is empty)")
    for entry in entries:
        shard = data_path / entry["name"]
        if not shard.is_file():
            raise FileNotFoundError(f"shard not found: {shard} (listed in {data_path / MANIFEST_NAME})")
        if "bytes" in entry and shard.stat().st_size != entry["bytes"]:
            raise ValueError(f"corrupt shard {shard}: {shard.stat().st_size} bytes, the manifest "
                             f"says {entry['bytes']}")
    memo_path = _memo_path(manifest, split, cache_dir) if memo else None
    ds = _read_memo(memo_path, manifest, split)
    if ds is not None:
        return ds
    samples, reference, link_members = [], None, []
    for entry in entries:
        shard = data_path / entry["name"]
        got, links, left_out = _read_shard(shard)
        if links:
            _log_links(log, shard, links, left_out)
            link_members.extend(f"{shard}:{link}" for link in links)
        if "count" in entry and len(got) + left_out != entry["count"]:
            raise ValueError(f"shard {shard} holds {len(got) + left_out} samples, its {MANIFEST_NAME} entry says "
                             f"count {entry['count']}")
        reference = check_samples_fit(got, manifest, shard, reference)
        samples.extend(got)
    if not samples:
        raise ValueError(f"split {split!r} of {data_path / MANIFEST_NAME} has no sample left: every one has a "
                         f"link member ({len(link_members)} not followed)")
    ds = ShardDataset.from_samples(samples, int(manifest["max_text_len"]), int(manifest["context_dim"]),
                                   manifest=manifest, split=split)
    ds.link_members = link_members
    if not link_members:
        _write_memo(memo_path, ds)
    return ds
