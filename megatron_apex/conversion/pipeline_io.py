"""A whole diffusers pipeline folder around an exported transformer (``export --base-pipeline``).

A pipeline folder is ``model_index.json`` plus one subfolder per component (scheduler/, vae/,
text_encoder/, tokenizer/, transformer/ ...). The export takes every entry of a base pipeline
except ``transformer/`` as it is and writes its own ``transformer/`` next to them. Files are
hard-linked when the base lies on the same filesystem (no extra disk space: a multi-GB text
encoder costs nothing) and copied otherwise; symbolic links (a Hugging Face cache snapshot is
made of them) are followed, so the output never points back into the base.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Dict

from megatron_apex.conversion import hf_io

MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
FLAG = "--base-pipeline"


def read_model_index(base: str) -> Dict:
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{FLAG} {base}: no such directory")
    path = os.path.join(base, MODEL_INDEX)
    if not os.path.isfile(path):
        hint = " (this is a model folder: pass the pipeline folder above it)" \
            if os.path.isfile(os.path.join(base, hf_io.CONFIG_NAME)) else ""
        raise FileNotFoundError(f"{FLAG} {base}: no {MODEL_INDEX}, not a diffusers pipeline folder{hint}")
    return hf_io.read_json(path, FLAG)


def check_base_pipeline(base: str, transformer_class: str) -> Dict:
    """The base's model_index.json, refused when its transformer is of another class (a Sana
    pipeline cannot take a Qwen-Image transformer) or it has no transformer slot at all."""
    index = read_model_index(base)
    entry = index.get(TRANSFORMER)
    if entry is None:
        raise ValueError(f"{FLAG} {base}: {MODEL_INDEX} has no {TRANSFORMER!r} component "
                         f"({index.get('_class_name')!r} takes no transformer)")
    found = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
    if found is not None and found != transformer_class:
        raise ValueError(f"{FLAG} {base}: its {TRANSFORMER} is {found!r}, the exported model a {transformer_class!r}")
    return index


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(os.path.realpath(src), dst)
        return "linked"
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copy2(src, dst)  # follows symlinks
    return "copied"


def populate_from_base(base: str, dest: str, transformer_class: str) -> Dict[str, int]:
    """Fill ``dest`` (an empty directory) with every entry of the pipeline ``base`` except its
    transformer/; model_index.json names ``transformer_class`` for the transformer. Returns how
    many files were hard-linked and copied."""
    index = check_base_pipeline(base, transformer_class)
    counts = {"linked": 0, "copied": 0}
    for name in sorted(os.listdir(base)):
        if name in (TRANSFORMER, MODEL_INDEX):
            continue
        src = os.path.join(base, name)
        if os.path.isdir(src):
            def copy(s, d):
                counts[_link_or_copy(s, d)] += 1
                return d

            shutil.copytree(src, os.path.join(dest, name), copy_function=copy)  # symlinks followed
        else:
            counts[_link_or_copy(src, os.path.join(dest, name))] += 1
    index[TRANSFORMER] = ["diffusers", transformer_class]
    with open(os.path.join(dest, MODEL_INDEX), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return counts
