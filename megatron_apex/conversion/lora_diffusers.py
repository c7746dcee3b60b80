"""LoRA adapters <-> diffusers / PEFT LoRA files (``pytorch_lora_weights.safetensors``).

Key names come from the model family's mapping table (megatron_apex/families/):
the adapter on our ``M`` becomes ``transformer.<hf module>.lora_A.weight`` / ``.lora_B.weight``
for each HF module the rule for ``M.weight`` lists. B goes through the rule's own transform
(a fused rule such as Qwen-Image's per-head ``linear_qkv`` = to_q, to_k, to_v splits B's rows);
A, one input projection shared by all the rule's HF modules, is repeated and only takes the
transform's change of shape (a 1x1 convolution's LoRA is [r, in, 1, 1] / [out, r, 1, 1] in
PEFT). A new family (Sana) needs no code here, only its table.

Scale: diffusers loads a file without alphas at scale 1 (PEFT lora_alpha = r), so the export
folds ``alpha / r`` into lora_B; the import divides it out again.

Trainable parameters other than adapters (the target-time embedder above all: APEX trains it
with the adapters, and the one-step jump depends on it) are full weights a LoRA file has no
place for. ``extras="separate"`` writes them beside the LoRA file, under diffusers names, in
``apex_extras.safetensors``, which the APEX pipelines' ``load_lora_weights`` load
(megatron_apex.inference.diffusers_apex); stock pipelines ignore the file.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from megatron.core import parallel_state as ps
from torch import nn

from megatron_apex.conversion import hf_io
from megatron_apex.conversion.engine import TRANSFORMS, expand, ours_to_hf
from megatron_apex.families import ModelFamily, family_names, family_of_config, get_family
from megatron_apex.lora.adapters import is_adapter_param_name, set_full_lora_weights_
from megatron_apex.lora.apply import _listing, global_named_parameters, lora_modules, unwrap
from megatron_apex.lora.merge import merged_state_dict
from megatron_apex.lora.state import METADATA_KEY
from megatron_apex.models.common.condition_shift import ConditionShift

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXTRAS_NAME = hf_io.EXTRAS_NAME  # the side file of every export
DIFFUSERS_PREFIX = "transformer"
EXTRAS_MODES = ("error", "drop", "separate")
# Table transforms that act on output rows (and the weight's shape) only, so B can go through
# them: {transform: the transform A takes (None = unchanged)}.
LORA_TRANSFORMS = {"copy": None, "qkv_per_head": None, "glu_interleave": None,
                   "conv1x1": "conv1x1", "conv1x1_glu_interleave": "conv1x1"}
_A, _B = ".lora_A.weight", ".lora_B.weight"


# ----------------------------------------------------------------------------- family / names
def resolve_family(model: nn.Module, family=None) -> ModelFamily:
    """The ``ModelFamily`` of ``model``: given (name or instance), or the registered family of
    its config."""
    if isinstance(family, ModelFamily):
        return family
    if isinstance(family, str):
        return get_family(family)
    root = unwrap(model)
    config = getattr(root, "model_config", None)
    if config is None:
        raise ValueError(f"{type(root).__name__} has no model_config; pass family= "
                         f"(one of {', '.join(family_names())})")
    return family_of_config(config)


def check_whole_model(root: nn.Module, what: str, allow_tp: bool) -> None:
    if ps.model_parallel_is_initialized() and not allow_tp and ps.get_tensor_model_parallel_world_size() > 1:
        raise ValueError(f"{what} needs a TP=1 model; load the LoRA checkpoint into one first "
                         "(dist checkpoints reshard)")
    config = root.model_config
    stages = (getattr(root, "pre_process", True), getattr(root, "post_process", True))
    if not all(stages) or getattr(root, "num_local_layers", config.num_layers) != config.num_layers:
        raise ValueError(f"{what} needs a single-stage model holding all {config.num_layers} layers")


def lora_key_map(model: nn.Module, family=None) -> Dict[str, Tuple[Tuple[str, ...], str]]:
    """{our adapted module: (its HF module names, the table transform)}."""
    root = unwrap(model)
    fam = resolve_family(root, family)
    config = root.model_config
    rules = {ours: (hf, rule) for ours, hf, rule in expand(fam.mapping_table(config), fam.num_layers(config))}
    out = {}
    for name in lora_modules(root):
        key = f"{name}.weight"
        if key not in rules:
            raise ValueError(f"adapted module {name}: the {fam.name} mapping table has no rule for {key}, so it has "
                             "no diffusers name")
        hf_keys, rule = rules[key]
        if rule.transform not in LORA_TRANSFORMS:
            raise ValueError(f"adapted module {name}: its table transform {rule.transform!r} is not known to act on "
                             f"output rows only (known: {', '.join(LORA_TRANSFORMS)}); cannot express its LoRA in "
                             "diffusers names")
        if not all(h.endswith(".weight") for h in hf_keys):
            raise ValueError(f"adapted module {name}: HF keys {list(hf_keys)} are not '<module>.weight' keys")
        out[name] = (tuple(h[: -len(".weight")] for h in hf_keys), rule.transform)
    if not out:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    return out


def _split_adapter(A: torch.Tensor, B: torch.Tensor, transform: str, ctx) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Our (A, B) -> (the HF lora_A shared by the rule's modules, one HF lora_B per module)."""
    shape = LORA_TRANSFORMS[transform]
    A_hf = A if shape is None else TRANSFORMS[shape][1](A, ctx)[0]
    return A_hf, list(TRANSFORMS[transform][1](B, ctx))


def _fuse_adapter(A_hf: torch.Tensor, Bs: List[torch.Tensor], transform: str, ctx) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = LORA_TRANSFORMS[transform]
    A = A_hf if shape is None else TRANSFORMS[shape][0]([A_hf], ctx)
    return A, TRANSFORMS[transform][0](Bs, ctx)


def unexportable_extras(root: nn.Module) -> List[str]:
    """Trainable non-adapter parameters that matter outside training. The condition shift is
    only used by the fake-condition branch of the training objective, so it does not count."""
    shift = {id(p) for m in root.modules() if isinstance(m, ConditionShift) for p in m.parameters()}
    return [n for n, p in global_named_parameters(root)
            if p.requires_grad and not is_adapter_param_name(n) and id(p) not in shift]


# ----------------------------------------------------------------------------- export
@torch.no_grad()
def diffusers_lora_state_dict(model: nn.Module, family=None, prefix: str = DIFFUSERS_PREFIX, extras: str = "error",
                              dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The adapters under diffusers' names, scale folded into lora_B (TP=1, one stage).

    ``extras``: trainable parameters other than adapters (e.g. the target-time embedder)
    have no place in a LoRA file: "error" refuses, "drop" and "separate" leave them out (the
    latter for :func:`diffusers_extras_state_dict` to write beside the file)."""
    if extras not in EXTRAS_MODES:
        raise ValueError(f"extras={extras!r}: choose one of {EXTRAS_MODES}")
    root = unwrap(model)
    check_whole_model(root, "diffusers LoRA export", allow_tp=False)
    fam = resolve_family(root, family)
    dropped = unexportable_extras(root)
    if dropped and extras == "error":
        raise ValueError(f"trainable {_listing(dropped)} cannot go into a diffusers LoRA file (it holds lora_A/lora_B "
                         "of existing linears only); pass extras='separate' (written beside it, for the APEX "
                         "pipelines), extras='drop' (then only queries that do not use them match, e.g. "
                         "t_target = t for the target-time embedder) or export the merged model")
    ctx = fam.transform_context(root.model_config)
    modules = lora_modules(root)
    lead = f"{prefix}." if prefix else ""
    out = {}
    for name, (hf_modules, transform) in lora_key_map(root, fam).items():
        m = modules[name]
        out_dtype = dtype or m.lora_A.dtype
        A, Bs = _split_adapter(m.lora_A.detach().float(), m.lora_B.detach().float() * m.lora_scale, transform, ctx)
        for hf_module, B_part in zip(hf_modules, Bs):
            out[f"{lead}{hf_module}{_A}"] = A.to(out_dtype).cpu().clone()  # one tensor per key (safetensors)
            out[f"{lead}{hf_module}{_B}"] = B_part.to(out_dtype).contiguous().cpu()
    return out


@torch.no_grad()
def diffusers_extras_state_dict(model: nn.Module, family=None, dtype: Optional[torch.dtype] = None
                                ) -> Dict[str, torch.Tensor]:
    """The trainable non-adapter parameters (``unexportable_extras``: the target-time embedder,
    ``extra_trainable`` ones) under diffusers' transformer names, through the family's table
    (TP=1, one stage); empty when there are none."""
    root = unwrap(model)
    check_whole_model(root, "diffusers extras export", allow_tp=False)
    fam = resolve_family(root, family)
    config = root.model_config
    rules = {ours: (hf, rule) for ours, hf, rule in expand(fam.mapping_table(config), fam.num_layers(config))}
    ctx = fam.transform_context(config)
    params = dict(global_named_parameters(root))
    out = {}
    for name in unexportable_extras(root):
        if name not in rules:
            raise ValueError(f"trainable {name}: the {fam.name} mapping table has no rule for it, so it has no "
                             "diffusers name")
        hf_keys, rule = rules[name]
        for hf_key, part in zip(hf_keys, TRANSFORMS[rule.transform][1](params[name].detach().float(), ctx)):
            out[hf_key] = part.to(dtype or params[name].dtype).contiguous().cpu().clone()
    return out


def _save_atomically(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file  # optional (the hf extra)

    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_diffusers_lora(model: nn.Module, out_dir: str, family=None, extras: str = "error",
                          dtype: Optional[torch.dtype] = None, weight_name: str = LORA_WEIGHT_NAME) -> str:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(out_dir)``
    (or ``transformer.load_lora_adapter``); returns the file's path. ``extras="separate"`` also
    writes the trainable extras to ``out_dir/apex_extras.safetensors`` (when there are any).
    Each file is written under a temporary name and renamed, so it is either complete or absent."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"LoRA export directory {out_dir} is a file")
    root = unwrap(model)
    fam = resolve_family(root, family)
    tensors = diffusers_lora_state_dict(root, fam, extras=extras, dtype=dtype)
    side = diffusers_extras_state_dict(root, fam, dtype=dtype) if extras == "separate" else {}
    meta = {
        "family": fam.name,
        "scale_folded_into_lora_B": True,
        "adapters": {n: {"kind": m.lora_kind, "rank": m.lora_rank, "alpha": m.lora_alpha}
                     for n, m in lora_modules(root).items()},
        "dropped_extras": [] if extras == "separate" else unexportable_extras(root),
        "extras_file": EXTRAS_NAME if side else None,
    }
    os.makedirs(out_dir, exist_ok=True)
    if side:
        _save_atomically(side, os.path.join(out_dir, EXTRAS_NAME), {"format": "pt", METADATA_KEY: json.dumps(
            {"family": fam.name, "extras_of": weight_name})})
    path = os.path.join(out_dir, weight_name)
    _save_atomically(tensors, path, {"format": "pt", METADATA_KEY: json.dumps(meta)})
    return path


def merged_diffusers_state_dict(model: nn.Module, family=None) -> Dict[str, torch.Tensor]:
    """The full model with adapters merged, under diffusers' names (via the conversion table;
    APEX extras included as the table writes them). TP=1, one stage."""
    root = unwrap(model)
    check_whole_model(root, "merged export", allow_tp=False)
    fam = resolve_family(root, family)
    config = root.model_config
    return ours_to_hf(merged_state_dict(root), fam.mapping_table(config), fam.num_layers(config),
                      fam.transform_context(config), source="the merged model state dict")


# ----------------------------------------------------------------------------- import
def _read(source: Union[str, Mapping[str, torch.Tensor]], weight_name: str):
    from safetensors import safe_open  # optional (the hf extra)
    from safetensors.torch import load_file

    if isinstance(source, Mapping):
        return dict(source), {}, "the LoRA state dict"
    path = os.path.join(source, weight_name) if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"LoRA file {path}: not a readable safetensors file ({err})") from None
    ours = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    return tensors, ours, f"LoRA file {path}"


@torch.no_grad()
def load_diffusers_lora(model: nn.Module, source: Union[str, Mapping[str, torch.Tensor]], family=None,
                        prefix: str = DIFFUSERS_PREFIX, strict: bool = True,
                        weight_name: str = LORA_WEIGHT_NAME) -> List[str]:
    """Load a diffusers LoRA (file, folder or state dict) into the model's adapters (apply_lora
    first, with the file's rank and targets); returns the loaded modules' names.

    Errors name the key: a shape mismatch (other model or rank), missing keys, keys of modules
    without an adapter (``strict``), keys of another LoRA format, distinct lora_A for the parts
    of a fused projection."""
    root = unwrap(model)
    check_whole_model(root, "LoRA import", allow_tp=True)
    fam = resolve_family(root, family)
    tensors, ours, label = _read(source, weight_name)
    if ours.get("family") not in (None, fam.name):
        raise ValueError(f"{label} is a LoRA for a {ours['family']} model, this model is {fam.name}")
    lead = f"{prefix}." if prefix else ""
    outside = [k for k in tensors if not k.startswith(lead)]
    if outside and strict:
        raise ValueError(f"{label}: keys outside '{lead}' (this loads the {prefix or 'model'} part only): "
                         f"{_listing(outside)}")
    keyed = {k[len(lead):]: v for k, v in tensors.items() if k.startswith(lead)}
    foreign = [k for k in keyed if not k.endswith((_A, _B))]
    if foreign:
        raise ValueError(f"{label}: key {lead + foreign[0]!r} is not a diffusers LoRA key ('<module>{_A}' / "
                         f"'<module>{_B}'); other LoRA formats (alphas, kohya names, DoRA) are not supported")

    key_map = lora_key_map(root, fam)
    expected = {f"{h}{s}" for hf_modules, _ in key_map.values() for h in hf_modules for s in (_A, _B)}
    unexpected = sorted(k for k in keyed if k not in expected)
    if unexpected and strict:
        extra_modules = sorted({lead + k.rsplit(".lora_", 1)[0] for k in unexpected})
        raise ValueError(f"{label} adapts modules this model has no adapter on: {_listing(extra_modules)} "
                         "(apply_lora with targets covering them, or strict=False)")
    modules = lora_modules(root)
    ctx = fam.transform_context(root.model_config)
    absent = {name: [f"{h}{s}" for h in hf_modules for s in (_A, _B) if f"{h}{s}" not in keyed]
              for name, (hf_modules, _) in key_map.items()}
    partial = [n for n, keys in absent.items() if 0 < len(keys) < 2 * len(key_map[n][0])]
    lacking = [n for n, keys in absent.items() if keys and (strict or n in partial)]
    if lacking:
        keys = [lead + k for n in lacking for k in absent[n]]
        raise ValueError(f"{label} lacks {_listing(keys)} (for the adapters on {_listing(lacking)})"
                         + ("" if partial else "; strict=False keeps adapters the file does not cover"))
    loaded = []
    for name, (hf_modules, transform) in key_map.items():
        if absent[name]:
            continue  # not strict: a module the file does not adapt keeps its adapter
        m = modules[name]
        (shape_A, shape_B) = m.lora_full_shapes()
        zero_A, zero_Bs = _split_adapter(torch.zeros(shape_A), torch.zeros(shape_B), transform, ctx)
        for hf_module, zero_B in zip(hf_modules, zero_Bs):
            for suffix, shape in ((_A, tuple(zero_A.shape)), (_B, tuple(zero_B.shape))):
                got = tuple(keyed[f"{hf_module}{suffix}"].shape)
                if got != shape:
                    raise ValueError(f"{label}: {lead}{hf_module}{suffix} has shape {list(got)}, the adapter on {name} "
                                     f"expects {list(shape)} (model adapter rank {m.lora_rank}; a different rank or "
                                     "another model?)")
        As = [keyed[f"{h}{_A}"].float() for h in hf_modules]
        if any(not torch.equal(As[0], a) for a in As[1:]):
            raise ValueError(f"{label}: {', '.join(lead + h + _A for h in hf_modules)} differ, but {name} fuses them "
                             "into one projection with one shared lora_A; this file cannot load into fused adapters")
        A, B = _fuse_adapter(As[0], [keyed[f"{h}{_B}"].float() for h in hf_modules], transform, ctx)
        set_full_lora_weights_(m, A, B / m.lora_scale, name)
        loaded.append(name)
    return loaded
