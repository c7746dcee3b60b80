#!/usr/bin/env python
"""Score generated samples: class accuracy, Frechet distance and diversity in the feature space
of a classifier trained on the real images (protocol: megatron_apex/eval/metrics.py).

    python tools/evaluate.py --samples out/samples.npz [--dataset fashion-mnist] [--json out.json]

The npz needs `images` (uint8, N x H x W x C or N x H x W) and `labels` (N,), as written by
tools/sample.py for labelled prompt sets. The JSON goes to --json, or next to the samples as
<prefix>.eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_apex.cli import OneLineErrorParser


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="npz with 'images' (uint8 N,H,W[,C]) and 'labels'")
    p.add_argument("--dataset", default=None, choices=["fashion-mnist", "digits"],
                   help="built-in dataset whose classifier/test split to use (default: the npz's "
                        "'dataset' entry, else fashion-mnist when installed, else digits)")
    p.add_argument("--json", default=None, help="output JSON (default: <samples prefix>.eval.json)")
    p.add_argument("--num-real", type=int, default=None,
                   help="real test images in the FD reference set (default: half the test split)")
    p.add_argument("--cache-dir", default=None, help="default: $MEGATRON_APEX_CACHE or ~/.cache/megatron_apex")
    return p.parse_args(argv)


def load_samples(path: Path):
    """(images uint8 (N, H, W[, C]), labels int64 (N,), the npz's dataset name or None); every
    error names the file and the array."""
    import zipfile

    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"--samples {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--samples {path} is not an npz archive (write it with numpy.savez or tools/sample.py)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"--samples {path} is not a readable npz: {exc}") from None
    with data:
        for key in ("images", "labels"):
            if key not in data.files:
                raise ValueError(f"--samples {path} has no '{key}' array (has {sorted(data.files)}); "
                                 "evaluation needs uint8 'images' and the conditioning 'labels'")
        images, labels, dataset = (_array(data, path, key) for key in ("images", "labels", "dataset"))
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(f"--samples {path}: 'images' must be uint8 (N, H, W) or (N, H, W, C) with C in 1/3, got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"--samples {path}: 'labels' must be integer class ids of shape (N,), got {labels.dtype} "
                         f"{labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"--samples {path}: {len(images)} 'images' but {len(labels)} 'labels'")
    return images, labels.astype(np.int64), (str(dataset) if dataset is not None else None)


def _array(data, path: Path, key: str):
    if key not in data.files:
        return None
    try:
        return data[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"--samples {path}: '{key}' is a pickled object array, refused (arrays are read "
                             "without unpickling)") from None
        raise ValueError(f"--samples {path}: '{key}' is not a readable array ({exc})") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_apex.eval.metrics import evaluate_images

    samples = Path(args.samples)
    images, labels, npz_dataset = load_samples(samples)
    result = evaluate_images(images, labels, dataset_name=args.dataset or npz_dataset,
                             num_real=args.num_real, cache_dir=args.cache_dir)
    result["samples"] = str(samples)
    cols = ["acc", "fd", "diversity", "fd_real", "fd_class_means", "diversity_real"]
    print(f"{'dataset':<14}{'N':>6}" + "".join(f"{c:>16}" for c in cols))
    print(f"{result['dataset']:<14}{result['num_generated']:>6}" + "".join(f"{result[c]:>16.4f}" for c in cols))
    out = Path(args.json) if args.json else samples.with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
