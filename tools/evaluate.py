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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"--samples {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"--samples {path} is not a readable npz: {exc}") from exc
    for key in ("images", "labels"):
        if key not in data.files:
            raise ValueError(f"--samples {path} has no '{key}' array (has {sorted(data.files)}); "
                             "evaluation needs uint8 'images' and the conditioning 'labels'")
    dataset = str(data["dataset"]) if "dataset" in data.files else None
    return data["images"], data["labels"], dataset


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
