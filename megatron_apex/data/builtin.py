"""Built-in small datasets: Fashion-MNIST (Debian package) or scikit-learn digits as fallback.

Both come out as 28x28 grey images with 10 classes, so one model config fits both.
Digits (8x8, ink 0..16) are bilinearly upsampled to 24x24, padded by 2 pixels of background
to 28x28 and quantised to uint8, so cached shards, the classifier and the metrics all see
exactly the same pixels. Digits' held-out test split is 600 images chosen by a seeded
permutation (seed 0); Fashion-MNIST uses its own 60k/10k split.

Captions: each sample gets one of a few templates per class (chosen by a seeded RNG);
`class_prompts` gives the fixed template-0 prompt per class used for sampling/evaluation.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatron_apex.data import shard_writer
from megatron_apex.data.text_encoder import ENCODER_NAME, MiniLMTextEncoder

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
BUILTIN_NAMES = ("fashion-mnist", "digits")
IMAGE_SIZE = 28
DIGITS_NUM_TEST = 600
# Bump when the shard content for the same config would change, so old caches are not reused.
BUILD_VERSION = 1

CLASS_NAMES = {
    "fashion-mnist": ["t-shirt", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
}

# Template 0 is the fixed sampling prompt of each class.
TEMPLATES = {
    "fashion-mnist": ["a photo of {a} {name}", "a black and white photo of {a} {name}",
                      "a grayscale picture of {a} {name}", "a small product image of {a} {name}",
                      "{a} {name}"],
    "digits": ["a handwritten digit {name}", "the number {name}, handwritten",
               "a drawing of the digit {name}", "a scan of a handwritten {name}",
               "the digit {name}"],
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _check_name(name: str) -> str:
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {BUILTIN_NAMES}")
    return name


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("MEGATRON_APEX_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def resolve_builtin_name(name: str | None = None) -> str:
    """None/"auto" -> Fashion-MNIST when its folder exists, else digits (with a notice)."""
    if name not in (None, "auto"):
        return _check_name(name)
    if fashion_mnist_dir().is_dir():
        return "fashion-mnist"
    print(f"[megatron_apex] {fashion_mnist_dir()} not found (Debian package dataset-fashion-mnist); "
          "using scikit-learn digits instead", file=sys.stderr)
    return "digits"


def class_names(name: str) -> list[str]:
    return list(CLASS_NAMES[_check_name(name)])


def prompts_for_class(name: str, label: int) -> list[str]:
    cls = CLASS_NAMES[_check_name(name)][label]
    return [t.format(a=_article(cls), name=cls) for t in TEMPLATES[name]]


def class_prompts(name: str) -> list[str]:
    """One fixed prompt per class (template 0), index = label."""
    return [prompts_for_class(name, c)[0] for c in range(len(CLASS_NAMES[_check_name(name)]))]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_APEX_CACHE") or Path.home() / ".cache" / "megatron_apex")


# ---------------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path, expected_ndim: int | None = None) -> np.ndarray:
    """Read a (gzipped) IDX file; magic = 0x00 0x00 <dtype code> <ndim>, big-endian dims."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"bad IDX magic number in {path}: {raw[:4].hex() or 'empty file'} "
                         "(expected 0000 <dtype code> <ndim>, e.g. 00000803 for images)")
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"IDX file {path} has {ndim} dimensions, expected {expected_ndim} "
                         f"(magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path} holds {len(raw) - header} data bytes, its header "
                         f"(shape {shape}) says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    root = fashion_mnist_dir()
    images = load_idx(root / f"{prefix}-images-idx3-ubyte.gz", expected_ndim=3)
    labels = load_idx(root / f"{prefix}-labels-idx1-ubyte.gz", expected_ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{root}/{prefix}-*: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2))
    images = (x.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return images, d.target.astype(np.int64)


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits_all()
    perm = np.random.default_rng(0).permutation(len(images))
    idx = np.sort(perm[:DIGITS_NUM_TEST] if split == "test" else perm[DIGITS_NUM_TEST:])
    return images[idx], labels[idx]


@functools.lru_cache(maxsize=4)
def load_builtin_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28), int64 labels (N,)) of a built-in split ("train"/"test")."""
    _check_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    images, labels = (_fashion_split if name == "fashion-mnist" else _digits_split)(split)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0)[:, None]


def load_builtin_images(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 images (N, 1, 28, 28) in [-1, 1] and int64 labels."""
    images, labels = load_builtin_arrays(name, split)
    return uint8_to_float(images), labels.copy()


# ------------------------------------------------------------------------------ shard cache

def _build_key(name: str, max_text_len: int, samples_per_shard: int, seed: int) -> str:
    spec = dict(version=BUILD_VERSION, name=name, max_text_len=max_text_len,
                samples_per_shard=samples_per_shard, seed=seed, encoder=ENCODER_NAME,
                templates=TEMPLATES[name], classes=CLASS_NAMES[name])
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def builtin_cache_path(cache_dir=None, name: str | None = None, max_text_len: int = 16,
                       samples_per_shard: int = 10000, seed: int = 0) -> Path:
    name = resolve_builtin_name(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _build_key(name, max_text_len, samples_per_shard, seed)
    return root / "datasets" / f"{name}-L{max_text_len}-{key}"


def build_builtin_shards(cache_dir=None, name: str | None = None, max_text_len: int = 16,
                         samples_per_shard: int = 10000, seed: int = 0, verbose: bool = True) -> Path:
    """Encode the captions once and cache train/test webdataset shards; return the folder.

    The folder name is keyed by everything that changes the content, so a second call with
    the same arguments returns at once. Shards are built in a temp folder and renamed, so a
    crash or a concurrent builder never leaves a half-written cache behind.
    """
    name = resolve_builtin_name(name)
    final = builtin_cache_path(cache_dir, name, max_text_len, samples_per_shard, seed)
    if (final / shard_writer.MANIFEST_NAME).is_file():
        return final
    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        encoder = MiniLMTextEncoder()
        rng = np.random.default_rng(seed)
        splits = {}
        for split in ("train", "test"):
            images, labels = load_builtin_arrays(name, split)
            templates = rng.integers(0, len(TEMPLATES[name]), size=len(labels))
            captions = [prompts_for_class(name, int(c))[int(t)] for c, t in zip(labels, templates)]
            unique = sorted(set(captions))
            states, masks = encoder.encode(unique, max_text_len)
            row = {c: i for i, c in enumerate(unique)}
            half = states.astype(np.float16)

            def samples(images=images, labels=labels, captions=captions):
                for i in range(len(labels)):
                    u = row[captions[i]]
                    n = int(masks[u].sum())  # store only the real tokens; the reader re-pads
                    yield dict(key=f"{i:07d}", image=images[i], context=half[u, :n],
                               mask=masks[u, :n], caption=captions[i], label=int(labels[i]))

            splits[split] = shard_writer.write_split(tmp, split, samples(), samples_per_shard,
                                                     group_key=lambda s: s["caption"])
        manifest = dict(
            format=shard_writer.SHARD_FORMAT, dataset=name, splits=splits,
            text_encoder=MiniLMTextEncoder.name, context_dim=MiniLMTextEncoder.dim,
            max_text_len=max_text_len, image_shape=[1, IMAGE_SIZE, IMAGE_SIZE],
            class_names=class_names(name), class_prompts=class_prompts(name), seed=seed,
        )
        shard_writer.write_manifest(tmp, manifest)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its cache has the same content.
            if not (final / shard_writer.MANIFEST_NAME).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        size = sum(f.stat().st_size for f in final.iterdir())
        print(f"[megatron_apex] built {name} shards in {time.perf_counter() - t0:.1f}s "
              f"({size / 2**20:.1f} MiB) at {final}", file=sys.stderr)
    return final
