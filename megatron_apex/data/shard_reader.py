"""One `megatron_apex.shards.v1` shard's bytes to decoded samples (megatron_apex/data/shards.py
describes the format and reads whole splits through this).

Nothing in a shard is trusted: arrays are read without unpickling, every member name must stay
inside the archive, a symbolic or hard link member is never followed (the sample it belongs to is
left out and named), and a damaged shard fails with one line naming it.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from megatron_apex.untrusted import safe_member_name

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
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            safe_member_name(m.name, archive)
            if m.issym() or m.islnk():
                links.append(m)
            elif m.isreg() and not _WDS_META.match(m.name):
                yield dict(fname=m.name, data=tar.extractfile(m).read(), __url__=archive)
            tar.members = []  # read as a stream: keep no index of the (many, small) members


def read_shard_samples(path: Path) -> tuple[list[dict], list[str], int]:
    """(decoded samples, the shard's link members, how many samples they left out)."""
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


def log_link_members(log: Callable[[str], None], path, links: list[str], left_out: int) -> None:
    log(f"[megatron_apex] data: {path}: {len(links)} link members not followed, {left_out} samples left "
        f"out: {', '.join(links)}")


def read_shard(path, log: Callable[[str], None] = print) -> list[dict]:
    """Decode every sample of one shard (webdataset's grouping of members into samples); samples
    with link members are left out, and named in one `log` line."""
    out, links, left_out = read_shard_samples(Path(path))
    if links:
        log_link_members(log, path, links, left_out)
    return out
