"""WebDataset shards of (image, text states, mask, caption, label): their manifest and their
in-memory reader (shard_writer.py writes them, shard_reader.py decodes one shard).

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

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megatron_apex.data.builtin import build_builtin_shards, default_cache_dir
from megatron_apex.data.sampler import GlobalBatchSampler
from megatron_apex.data.shard_reader import log_link_members, read_shard_samples
from megatron_apex.data.shard_writer import MANIFEST_NAME, SHARD_FORMAT


def read_manifest(data_path) -> dict:
    data_path = Path(data_path)
    if data_path.is_file() and data_path.name == MANIFEST_NAME:
        data_path = data_path.parent
    if not data_path.is_dir():
        raise FileNotFoundError(f"--data-path {data_path} is not a directory of shards")
    path = data_path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in --data-path {data_path} "
                                "(write shards with megatron_apex.data.shard_writer.write_split/write_manifest)")
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

    # A split holds one image shape, and a damaged shard fails the load instead of being
    # skipped: there is nothing to count (megatron_apex.data.dataset.TrainingDataset).
    skipped = None

    def sample_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch_sampler(self, global_batch_size: int, seed: int, consumed_samples: int = 0) -> GlobalBatchSampler:
        return GlobalBatchSampler(len(self), global_batch_size, seed, consumed_samples=consumed_samples)

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
        got, links, left_out = read_shard_samples(shard)
        if links:
            log_link_members(log, shard, links, left_out)
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
