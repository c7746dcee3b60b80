"""import: a diffusers folder -> our megatron-core distributed checkpoint, streamed.

The safetensors headers are checked against the keys and shapes the family's table expects
before anything is read. The checkpoint is then written by megatron's ``dist_checkpointing``
from this ONE process (it accepts several shards of a key from one rank) through
``streaming_save``: when the writer reaches a tensor, its HF tensors are read, converted (QKV
fused), cut into the tensor-parallel pieces a TP=T run would save, written and dropped.
Pipeline stages address layers by their global index, so a checkpoint has no pipeline layout
of its own: any TP/PP run (and any other) loads it, resharding on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_apex import checkpoint
from megatron_apex.conversion import hf_io, streaming_save
from megatron_apex.conversion.checkpoint_io import (
    check_hf_keys,
    config_for_folder,
    init_single_process,
    listing,
    meta_model,
    plain_state,
    progress_bar,
)
from megatron_apex.conversion.engine import expand
from megatron_apex.conversion.state_dicts import hf_to_megatron
from megatron_apex.families import ModelFamily


def _registry_name(family: ModelFamily, config) -> Tuple[str, str]:
    """(registry name to rebuild ``config`` from, how it matches: "exact" | "architecture" |
    "none"). All fields are saved, so any name rebuilds the model; the match tells the user
    which --model to train with."""
    ours = dataclasses.asdict(config)
    same_arch = None
    for name, factory in family.model_names().items():
        theirs = dataclasses.asdict(factory())
        if theirs == ours:
            return name, "exact"
        if same_arch is None and all(theirs.get(k) == ours.get(k) for k in family.arch_fields):
            same_arch = name
    return (same_arch, "architecture") if same_arch else (family.default_model_name, "none")


def _json_ready(value):
    return json.loads(json.dumps(value, default=str))


def _check_parallel_sizes(tp, pp) -> None:
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")


def _check_tp_divides(shapes: Mapping[str, Tuple[int, ...]], split_dims: Mapping[str, Optional[int]],
                      tp: int) -> None:
    for key, shape in shapes.items():
        dim = split_dims.get(key)
        if dim is not None and shape[dim] % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide dim {dim} of {key!r} "
                             f"({shape[dim]})")


def _write_checkpoint(save_dir: str, sharded: Dict, index: Mapping, source, train_state: Dict) -> str:
    """``save_dir/iter_0000000`` (tensors streamed from ``source``), its train_state.json and
    ``save_dir/latest``: the layout the trainer writes and loads."""
    ckpt = checkpoint.checkpoint_dir(save_dir, 0)
    os.makedirs(ckpt)
    streaming_save.save(sharded, index, source, ckpt)
    checkpoint.write_json_atomic(os.path.join(ckpt, checkpoint.TRAIN_STATE), train_state)
    with open(os.path.join(save_dir, checkpoint.LATEST), "w") as f:
        f.write("0\n")
    return ckpt


def _train_state(family: ModelFamily, config, name: str, match: str, tp: int, pp: int, hf_path: str,
                 diffusers_config: Dict, source: hf_io.SafetensorsFolder) -> Dict:
    """The train_state.json of an imported checkpoint: a fresh run's, plus where it came from."""
    source_dtype = source.dominant_dtype()
    return {
        "iteration": 0,
        "consumed_samples": 0,
        "model_name": name,
        "model_config": _json_ready(dataclasses.asdict(config)),
        "has_ema": False,
        "has_teacher": False,
        "args": {"model": name, "data": {"data_path": None},
                 "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}},
        "source": {
            "format": "diffusers", "family": family.name, "hf_path": os.path.abspath(hf_path),
            "config_sha256": hf_io.file_sha256(os.path.join(hf_path, hf_io.CONFIG_NAME)),
            "diffusers_config": diffusers_config,
            "dtype": str(source_dtype).replace("torch.", "") if source_dtype is not None else None,
            "weight_files": source.files,
            "registry_match": match,
        },
    }


def import_hf(family: ModelFamily, hf_path: str, save: str, tensor_model_parallel_size: int = 1,
              pipeline_model_parallel_size: int = 1, overrides: Optional[Mapping] = None,
              model_name: Optional[str] = None, on_convert: Optional[Callable] = None,
              progress: bool = False) -> Dict:
    """diffusers folder -> ``save/iter_0000000`` (+ ``latest``); returns the train state written.

    Streams: each of our tensors is read from the safetensors file(s), converted and written
    when the checkpoint writer reaches it (``streaming_save``). ``on_convert(key, tensor)``
    (tests, measurements) sees every converted tensor; ``progress``: a bar of them on stderr."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    _check_parallel_sizes(tp, pp)
    config, diffusers_config = config_for_folder(family, hf_path, overrides)
    hf_io.check_output_path(save, "--save")
    config.validate(tp)
    layers = family.num_layers(config)
    if layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide the model's {layers} layers")
    if model_name is not None and model_name not in family.model_names():
        raise ValueError(f"--model-name {model_name!r}: not a registered model; known: "
                         f"{', '.join(sorted(family.model_names()))}")

    with hf_io.SafetensorsFolder(hf_path, "--hf-path") as source:
        check_hf_keys(family, config, source, "--hf-path")
        split_dims = {ours: rule.tp_split_dim for ours, _, rule in expand(family.mapping_table(config), layers)}
        meta = meta_model(family, config)
        shapes = {key: tuple(tensor.shape) for key, tensor in plain_state(meta).items()}
        _check_tp_divides(shapes, split_dims, tp)

        init_single_process()
        prefix = "model."
        template = meta.sharded_state_dict(prefix=prefix)
        # Nothing is read yet: each tensor is read and converted when the writer asks for it.
        tensors = hf_to_megatron(source, config, source=f"--hf-path {hf_path}", lazy=True, family=family)
        wanted = {v.key[len(prefix):] for v in template.values() if isinstance(v, ShardedTensor)}
        if set(tensors) != wanted:
            raise ValueError(f"converted keys and model disagree: only converted "
                             f"{listing(sorted(set(tensors) - wanted))}; only in the model "
                             f"{listing(sorted(wanted - set(tensors)))}")
        bar = progress_bar(len(tensors), "import", progress)

        def converted(key: str, tensor: torch.Tensor) -> None:
            bar.update(1)
            if on_convert is not None:
                on_convert(key, tensor)

        pieces = streaming_save.PieceSource(tensors, shapes, split_dims, tp, config.torch_dtype, converted)
        sharded, index = streaming_save.lazy_sharded_state_dict(template, pieces, prefix)
        name, match = (model_name, "given") if model_name else _registry_name(family, config)
        train_state = _train_state(family, config, name, match, tp, pp, hf_path, diffusers_config, source)
        with bar, hf_io.atomic_output_dir(save, "--save") as tmp:
            _write_checkpoint(tmp, sharded, index, pieces, train_state)
    return train_state
