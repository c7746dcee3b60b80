"""Writing `megatron_apex.shards.v1`: webdataset shards of (image, text states, mask, caption,
label) and their manifest (the layout is described in megatron_apex/data/shards.py, which reads
them).

Writes are reproducible (identical content gives identical bytes, so the manifest's content
hash is too) and atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import webdataset as wds
from PIL import Image

SHARD_FORMAT = "megatron_apex.shards.v1"
MANIFEST_NAME = "manifest.json"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
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
