"""One shard of `megatron_apex.latent_shards.v1`: its inputs read, decoded and encoded, then its
tar, its sample index and its manifest entry written (temporary names, then renamed: the tar
last, so a shard counts as done only once everything it needs is in place)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_apex.data.latent_format import INDEX_COLUMNS, MEMBERS, index_name, shard_names
from megatron_apex.data.prepare.config import PrepareConfig
from megatron_apex.data.prepare.encode import decode_dali, decode_pil, encode_latents, encode_texts
from megatron_apex.data.prepare.inputs import InputItem, read_item


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; return the offset of its data in the (uncompressed) tar stream."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    # the data ends the stream written so far, padded to whole 512-byte blocks
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sample_members(latent: np.ndarray, state: np.ndarray, caption: str, info: dict) -> tuple[dict, dict]:
    """({suffix: bytes} of one sample, {suffix: payload bytes past the .npy header})."""
    ctx = state.astype(np.float16)
    mask = np.ones(len(ctx), dtype=bool)  # the real tokens only: the loader pads
    arrays = {"latent.npy": latent, "ctx.npy": ctx, "mask.npy": mask}
    payload = {suffix: npy_bytes(a) for suffix, a in arrays.items()}
    payload["txt"] = caption.encode("utf-8")
    payload["json"] = json.dumps(info, sort_keys=True).encode()
    header = {suffix: len(payload[suffix]) - a.nbytes for suffix, a in arrays.items()}
    return payload, header


def _read_inputs(items: list[InputItem]) -> tuple[list, list]:
    """[(offset, item, image bytes, caption)] of the readable inputs, [(offset, skip entry)] of the others."""
    read, skipped, tars = [], [], {}
    try:
        for offset, item in enumerate(items):
            try:
                data, caption = read_item(item, tars)
            except ValueError as exc:
                skipped.append((offset, dict(input=item.name, reason=str(exc))))
                continue
            read.append((offset, item, data, caption))
    finally:
        for tar, _ in tars.values():
            tar.close()
    return read, skipped


def _tar_bytes(samples, compress: bool) -> tuple[bytes, list, dict]:
    """(the tar's bytes, its index rows, {latent grid: samples}) of (key, latent, state, caption, info) samples."""
    raw = io.BytesIO()
    stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if compress else raw
    rows, bucket_counts = [], {}
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, latent, state, caption, info in samples:
            payload, header = _sample_members(latent, state, caption, info)
            at = {suffix: _add_member(tar, f"{key:08d}.{suffix}", payload[suffix]) for suffix in MEMBERS}
            row = [key]
            for suffix in ("latent.npy", "ctx.npy", "mask.npy"):
                row += [at[suffix] + header[suffix], len(payload[suffix]) - header[suffix]]
            ctx_itemsize = np.dtype(np.float16).itemsize  # _sample_members stores the states as float16
            row += [at["txt"], len(payload["txt"]), latent.itemsize, ctx_itemsize, len(state), *info["latent_size"]]
            rows.append(row)
            grid = "x".join(map(str, info["latent_size"]))
            bucket_counts[grid] = bucket_counts.get(grid, 0) + 1
    if compress:
        stream.close()
    return raw.getvalue(), rows, bucket_counts


def build_shard(cfg: PrepareConfig, index: int, first: int, items: list[InputItem], buckets: list,
                geom: dict, signature: str, progress=None) -> dict:
    """Encode and write shard `index` (inputs first, first+1, ...) and its index; return its entry.
    `progress(n)` is told of every n images encoded."""
    tar_name, entry_name = shard_names(index, cfg.compress)
    out = Path(cfg.output)
    mode = "L" if geom["image_channels"] == 1 else "RGB"
    read, skipped = _read_inputs(items)
    datas = [data for _, _, data, _ in read]
    decoded = decode_dali(datas, mode, buckets, cfg) if cfg.decoder == "dali" else decode_pil(datas, mode, buckets)
    keys, pixels, captions, infos = [], [], [], []
    f = geom["factor"]
    for (offset, item, _, caption), got in zip(read, decoded):
        if isinstance(got, ValueError):
            skipped.append((offset, dict(input=item.name, reason=str(got))))
            continue
        image, (height, width), bucket = got
        keys.append(first + offset)
        pixels.append(image)
        captions.append(caption)
        infos.append(dict(original_size=[height, width], bucket=list(bucket),
                          latent_size=[bucket[0] // f, bucket[1] // f], source=item.name))
    skipped = [sk for _, sk in sorted(skipped, key=lambda pair: pair[0])]  # in input order, as listed
    if progress is not None and len(items) > len(keys):
        progress(len(items) - len(keys))  # the skipped inputs are done too
    latents = encode_latents(pixels, cfg, geom, progress) if pixels else []
    states = encode_texts(captions, cfg) if captions else []
    data, rows, bucket_counts = _tar_bytes(zip(keys, latents, states, captions, infos), cfg.compress)
    index_bytes = npy_bytes(np.asarray(rows, dtype=np.int64).reshape(len(rows), len(INDEX_COLUMNS)))
    entry = dict(name=tar_name, index=index, count=len(keys), bytes=len(data),
                 sha256=hashlib.sha256(data).hexdigest(), buckets=dict(sorted(bucket_counts.items())),
                 skipped=skipped, signature=signature,
                 sample_index=dict(name=index_name(index), sha256=hashlib.sha256(index_bytes).hexdigest()))
    tmp = out / f"{tar_name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    # the index and the entry first, the tar last: a shard counts as done only once its tar has
    # its final name
    atomic_write(out / index_name(index), index_bytes)
    atomic_write(out / entry_name, json.dumps(entry, indent=1, sort_keys=True).encode())
    os.replace(tmp, out / tar_name)
    return entry


def existing_entry(out: Path, index: int, compress: bool, signature: str) -> Optional[dict]:
    tar_name, entry_name = shard_names(index, compress)
    if not ((out / tar_name).is_file() and (out / entry_name).is_file()):
        return None
    try:
        entry = json.loads((out / entry_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged entry: rebuild the shard
    if entry.get("signature") != signature:
        raise ValueError(f"--output {out}: {tar_name} was prepared from other inputs or settings; "
                         "use a new --output folder (or delete its shards)")
    if entry.get("bytes") != (out / tar_name).stat().st_size:
        return None
    index_path = out / index_name(index)
    recorded = entry.get("sample_index")
    if not (isinstance(recorded, dict) and index_path.is_file()
            and hashlib.sha256(index_path.read_bytes()).hexdigest() == recorded.get("sha256")):
        return None  # a shard without its index: rebuild both
    return entry

