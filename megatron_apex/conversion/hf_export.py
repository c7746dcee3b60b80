"""export: our checkpoint (any TP/PP) -> a diffusers transformer folder, or a whole pipeline
folder, streamed.

The checkpoint's full (TP=1) tensors are read with torch DCP (which assembles whatever TP/PP
pieces were saved; megatron_apex/checkpoint/tensors.py) in groups of about the largest
tensor's size; each tensor is split back into diffusers' keys and written straight into its
safetensors shard, whose layout was computed beforehand from the shapes alone. Memory holds
about one group, whatever the model and shard sizes.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_apex import checkpoint, families
from megatron_apex.checkpoint.tensors import CheckpointTensors, Entry, MetaTensors, saved_tensors_metadata
from megatron_apex.conversion import hf_io, pipeline_io
from megatron_apex.conversion.checkpoint_io import (
    APEX_CONFIG_NAME,
    DTYPES,
    EXTRAS_MODES,
    WEIGHTS,
    counted,
    init_single_process,
    listing,
    meta_model,
    progress_bar,
)
from megatron_apex.conversion.engine import expand, iter_ours_to_hf
from megatron_apex.families import ModelFamily


def hf_items(family: ModelFamily, config, tensors: Mapping[str, torch.Tensor], out_dtype: torch.dtype, extras: str,
             source: str) -> Iterator[Tuple[str, torch.Tensor, bool]]:
    """(diffusers key, tensor in ``out_dtype``, is APEX extra) for our (TP=1) ``tensors``, one
    of ours read at a time, in table order; extras left out with ``extras == "drop"``."""
    for hf_key, tensor, rule in iter_ours_to_hf(tensors, family.mapping_table(config), family.num_layers(config),
                                                family.transform_context(config), source=source):
        if rule.optional and extras == "drop":
            continue
        yield hf_key, tensor.to(out_dtype), rule.optional


def write_hf_transformer(folder: str, family: ModelFamily, config, make_tensors: Callable[[bool], Mapping],
                         out_dtype: torch.dtype, extras: str, max_shard_size: int,
                         source: str, progress: bool = False) -> Tuple[List[str], List[str]]:
    """A diffusers transformer folder's weights (``folder`` exists), streamed: the layout is
    computed from ``make_tensors(True)`` (meta tensors), then ``make_tensors(False)`` is read
    one tensor at a time and each result written to disk at once (``progress``: a bar of them
    on stderr). Returns (files, extra keys)."""
    layout = [(key, extra) for key, _, extra in hf_items(family, config, make_tensors(True), out_dtype, extras,
                                                         source)]
    extra_keys = [key for key, extra in layout if extra]
    with progress_bar(len(layout), "export", progress) as bar:
        def items(meta: bool):
            stream = hf_items(family, config, make_tensors(meta), out_dtype, extras, source)
            return stream if meta else counted(stream, bar)

        files = hf_io.write_tensor_stream(folder, items, max_shard_size, separate_extras=extras == "separate")
    return files, extra_keys


def check_pipeline_interface(family: ModelFamily, config, base: str, flag: str = "--base-pipeline") -> None:
    """The base pipeline's other components were made for its own transformer: refuse ours
    when it differs in what they fix (latent channels, text-state width), as read from the
    base's ``transformer/config.json`` (not checked when the base has none)."""
    theirs_path = os.path.join(base, pipeline_io.TRANSFORMER, hf_io.CONFIG_NAME)
    if not os.path.isfile(theirs_path):
        return
    theirs = hf_io.read_json(theirs_path, flag)
    ours = family.config_to_diffusers(config)
    differs = [f"{k} {theirs.get(k)!r} (ours {ours[k]!r})" for k in family.pipeline_fields
               if k in theirs and theirs.get(k) != ours[k]]
    if differs:
        raise ValueError(f"{flag} {base}: its other components expect a transformer with "
                         f"{', '.join(differs)}")


# ============================================================================ export_hf's steps
def _check_options(weights: str, extras: str, dtype: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose one of {WEIGHTS}")
    if extras not in EXTRAS_MODES:
        raise ValueError(f"--extras {extras!r}: choose one of {EXTRAS_MODES}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")


def _saved_shape(state: Mapping) -> str:
    """'N layers, hidden size H' of a checkpoint's model, from its train_state.json (for messages)."""
    saved = state.get("model_config")
    saved = saved if isinstance(saved, dict) else {}
    heads, dim = saved.get("num_attention_heads"), saved.get("attention_head_dim")
    hidden = heads * dim if isinstance(heads, int) and isinstance(dim, int) else "?"
    return f"{saved.get('num_layers', '?')} layers, hidden size {hidden}"


def _check_holds_family(family: ModelFamily, ckpt: str, state: Mapping) -> None:
    name = state.get("model_name")
    if name in family.model_names():
        return
    other = next((f.name for f in families.families() if f.name != family.name and name in f.presets), None)
    hint = f" (use --model {other})" if other else ""
    # the registry name alone misleads: an imported model of no registry shape is saved under its family's default
    raise ValueError(f"--load {ckpt}: holds a {other or 'non-' + family.name} model "
                     f"({_saved_shape(state)}; registry name {name!r}), not a --model {family.name} model{hint}")


def _config_of(family: ModelFamily, ckpt: str, state: Mapping):
    try:
        return family.config_from_saved(state)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--load {ckpt}: cannot rebuild the model config from train_state.json ({err})") from None


def _diffusers_config(family: ModelFamily, config, source: Mapping) -> Dict:
    """config.json of the export: the imported one as it was (its diffusers version, fields of
    other versions) when the architecture is unchanged, else ours."""
    ours = family.config_to_diffusers(config)
    original = source.get("diffusers_config")
    if isinstance(original, dict) and original.get("_class_name") == family.diffusers_class and \
            all(original.get(k) == ours[k] for k in family.arch_fields):
        return original
    return ours


def _tensor_entries(family: ModelFamily, config, ckpt: str, weights: str) -> Tuple[Dict[str, Entry], List[str]]:
    """({our key: its checkpoint entry}, our keys in table order) of ``weights``, after checking
    the checkpoint holds every tensor of the model at its shape and the table covers the model."""
    prefix = f"{weights}."
    template = {k: v for k, v in meta_model(family, config).sharded_state_dict(prefix=prefix).items()
                if isinstance(v, ShardedTensor)}
    by_key = {v.key[len(prefix):]: v for v in template.values()}
    saved = saved_tensors_metadata(ckpt)
    missing = sorted(v.key for v in template.values() if v.key not in saved)
    mismatched = sorted(f"{v.key} {list(saved[v.key].global_shape)} (model {list(v.global_shape)})"
                        for v in template.values() if v.key in saved
                        and tuple(saved[v.key].global_shape) != tuple(v.global_shape))
    if missing or mismatched:
        parts = ([f"missing tensors: {listing(missing)}"] if missing else []) + \
                ([f"shape mismatches: {listing(mismatched)}"] if mismatched else [])
        raise ValueError(f"--load {ckpt}: does not match the model its train_state.json describes: " + "; ".join(parts))

    rules = [(o, h, r) for o, h, r in expand(family.mapping_table(config), family.num_layers(config))
             if o in by_key or not r.optional]
    absent = sorted(o for o, _, _ in rules if o not in by_key)
    unmapped = sorted(set(by_key) - {o for o, _, _ in rules})
    if absent or unmapped:
        raise ValueError(f"mapping table and model disagree: table-only {listing(absent)}; "
                         f"model-only {listing(unmapped)}")
    entries = {o: (by_key[o].key, tuple(by_key[o].global_shape), saved[by_key[o].key].dtype) for o, _, _ in rules}
    return entries, [o for o, _, _ in rules]


def _write_json(path: str, payload: Dict, indent: int) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=indent, sort_keys=True)
        f.write("\n")


def export_hf(family: ModelFamily, load: str, out: str, weights: str = "model",
              max_shard_size="5GB", dtype: str = "auto", extras: str = "inline",
              base_pipeline: Optional[str] = None, read_group_bytes: Optional[int] = None,
              on_read: Optional[Callable[[List[str]], None]] = None, progress: bool = False) -> Dict:
    """Our checkpoint (any TP/PP) -> a diffusers transformer folder, or with ``base_pipeline``
    a pipeline folder: the base's other components (``pipeline_io.populate_from_base``:
    copies, links out of the base refused) and our transformer in ``transformer/``. Streams: the
    checkpoint is read in groups of at most ``read_group_bytes`` (default: the largest
    tensor's size) and every converted tensor is written to its shard at once; ``on_read``
    (tests, measurements) sees each group read; ``progress``: a bar of the tensors written on
    stderr. Returns a summary."""
    _check_options(weights, extras, dtype)
    shard_bytes = hf_io.parse_size(max_shard_size)
    ckpt = checkpoint.resolve_checkpoint(load, "--load")
    state = checkpoint.read_train_state(ckpt)
    hf_io.check_output_path(out, "--hf-path")
    if weights == "ema" and not state.get("has_ema"):
        raise ValueError(f"--weights ema: {ckpt} holds no EMA weights (trained with --ema-decay 0)")
    _check_holds_family(family, ckpt, state)
    config = _config_of(family, ckpt, state)
    diffusers_config = _diffusers_config(family, config, state.get("source") or {})
    if base_pipeline is not None:
        pipeline_io.check_base_pipeline(base_pipeline, family.diffusers_class)
        check_pipeline_interface(family, config, base_pipeline)
    saved_dtype = (state.get("source") or {}).get("dtype") or ""
    out_dtype = DTYPES.get(saved_dtype, config.torch_dtype) if dtype == "auto" else DTYPES[dtype]

    checkpoint.check_checkpoint_files(ckpt, checkpoint.check_checkpoint_pickles(ckpt))
    init_single_process()
    entries, order = _tensor_entries(family, config, ckpt, weights)
    if read_group_bytes is None:
        read_group_bytes = max(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in entries.values())

    def tensors(meta: bool) -> Mapping[str, torch.Tensor]:
        return MetaTensors(entries) if meta else CheckpointTensors(ckpt, entries, order, read_group_bytes, on_read)

    with hf_io.atomic_output_dir(out, "--hf-path") as tmp:
        copied = None
        folder = tmp
        if base_pipeline is not None:
            copied = pipeline_io.populate_from_base(base_pipeline, tmp, family.diffusers_class,
                                                    target_time_embedder=config.target_time_embedder
                                                    and extras != "drop")
            folder = os.path.join(tmp, pipeline_io.TRANSFORMER)
            os.makedirs(folder)
        files, written_extras = write_hf_transformer(folder, family, config, tensors, out_dtype, extras, shard_bytes,
                                                     source=f"--load {ckpt}", progress=progress)
        _write_json(os.path.join(folder, hf_io.CONFIG_NAME), diffusers_config, indent=2)
        _write_json(os.path.join(folder, APEX_CONFIG_NAME), {
            "family": family.name, "model_name": state.get("model_name"), "model_config": state["model_config"],
            "weights": weights, "checkpoint": os.path.abspath(ckpt), "iteration": state.get("iteration"),
            "extras": extras, "extra_keys": written_extras, "dtype": str(out_dtype).replace("torch.", ""),
            "base_pipeline": os.path.abspath(base_pipeline) if base_pipeline else None}, indent=1)
    return {"files": files, "extras": written_extras, "dtype": out_dtype, "checkpoint": ckpt, "weights": weights,
            "base_pipeline": copied}
