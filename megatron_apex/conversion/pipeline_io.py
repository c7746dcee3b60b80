"""A whole diffusers pipeline folder around an exported transformer (``export --base-pipeline``).

A pipeline folder is ``model_index.json`` plus one subfolder per component (scheduler/, vae/,
text_encoder/, tokenizer/, transformer/ ...). The export takes every entry of a base pipeline
except ``transformer/`` as it is and writes its own ``transformer/`` next to them. Files are
copied (the kernel's in-place copy), so the export is a folder of its own that can be handed
on: no link points back into the base, and no file of the machine outside the base ends up in
it. A base file that would lead outside the base folder (a symbolic link out of it, or a hard
link, whose other names may be any file) is refused, naming it; symbolic links inside the base,
or into a Hugging Face cache's own ``blobs/`` (a cache snapshot is made of them), are followed.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterator

from megatron_apex.conversion import hf_io
from megatron_apex.untrusted import link_escape

MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
FLAG = "--base-pipeline"
# Stock text-to-image pipeline -> the APEX pipeline that samples with the target-time embedder
# (megatron_apex.inference.diffusers_apex.PIPELINES; names only, conversion needs no diffusers).
APEX_PIPELINES = {"QwenImagePipeline": "ApexQwenImagePipeline", "SanaPipeline": "ApexSanaPipeline"}


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
    if found is not None and found not in (transformer_class, f"Apex{transformer_class}"):
        raise ValueError(f"{FLAG} {base}: its {TRANSFORMER} is {found!r}, the exported model a {transformer_class!r}")
    return index


def _base_files(base: str) -> Iterator[str]:
    """The base's files (relative paths) outside transformer/ and model_index.json, each
    checked not to lead outside ``base``."""
    for parent, dirs, files in os.walk(base, followlinks=True):
        rel = os.path.relpath(parent, base)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != TRANSFORMER]
            files = [f for f in files if f != MODEL_INDEX]
        for d in dirs:
            escape = link_escape(os.path.join(parent, d), base)
            if escape is not None:
                raise ValueError(f"{FLAG} {os.path.join(parent, d)}: {escape}; an export copies only what lies "
                                 "inside the base")
        for name in sorted(files):
            path = os.path.join(parent, name)
            escape = link_escape(path, base)
            if escape is not None:
                raise ValueError(f"{FLAG} {path}: {escape}; an export copies only what lies inside the base "
                                 "(make a plain copy of the pipeline)")
            yield os.path.normpath(os.path.join(rel, name))


def pipeline_class_for(base_class, target_time_embedder: bool):
    """The pipeline ``_class_name`` an export writes: the APEX pipeline when the exported
    transformer carries a target-time embedder (the stock pipeline never uses it), the stock one
    when it does not; a class this module does not know stays as the base has it."""
    stock = {apex: stock for stock, apex in APEX_PIPELINES.items()}.get(base_class, base_class)
    if stock not in APEX_PIPELINES:
        return base_class
    return APEX_PIPELINES[stock] if target_time_embedder else stock


def populate_from_base(base: str, dest: str, transformer_class: str,
                       target_time_embedder: bool = False) -> Dict[str, object]:
    """Fill ``dest`` (an empty directory) with every file of the pipeline ``base`` except its
    transformer/; model_index.json names the stock ``transformer_class`` for the transformer
    (stock pipelines load it without us) and, for a transformer with a target-time embedder,
    the APEX pipeline class (``pipeline_class_for``). Every file is checked before the first is
    copied. Returns how many files and bytes were copied, and the pipeline class written."""
    index = check_base_pipeline(base, transformer_class)
    files = list(_base_files(base))
    counts = {"files": 0, "bytes": 0}
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(base, rel), os.path.join(dest, rel))
        counts["files"] += 1
        counts["bytes"] += os.path.getsize(os.path.join(dest, rel))
    index[TRANSFORMER] = ["diffusers", transformer_class]
    index["_class_name"] = pipeline_class_for(index.get("_class_name"), target_time_embedder)
    with open(os.path.join(dest, MODEL_INDEX), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return {**counts, "pipeline_class": index["_class_name"]}
