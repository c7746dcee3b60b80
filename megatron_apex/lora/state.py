"""Small LoRA checkpoints (only the trainable parameters), the base-model fingerprint that
ties them to their base, and the parameter / optimizer-memory summary."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import nn

from megatron_apex.lora.adapters import is_adapter_param_name
from megatron_apex.lora.apply import _listing, global_named_parameters, lora_modules, unwrap

FINGERPRINT_VERSION = 1
METADATA_KEY = "megatron_apex_lora"
CHECKPOINT_FORMAT = "megatron_apex.lora/1"


# ============================================================================ trainable state
def trainable_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """{global name: parameter} of everything that requires grad."""
    return {n: p for n, p in global_named_parameters(model) if p.requires_grad}


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, keyed by global names (this rank's shards
    at TP > 1; use :func:`filter_trainable` with dist checkpointing there)."""
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                              source: str = "the LoRA state dict") -> Tuple[List[str], List[str]]:
    """Copy ``state_dict`` into the trainable parameters; returns (missing, unexpected).

    ``strict``: every trainable parameter must be present and nothing else. A shape mismatch
    is always an error (it names the key and both shapes)."""
    params = trainable_parameters(model)
    frozen = {n for n, p in global_named_parameters(model) if not p.requires_grad}
    missing = [k for k in params if k not in state_dict]
    unexpected = [k for k in state_dict if k not in params]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            hint = " (frozen in this model: was it trained with other LoRA targets / extras?)" \
                if any(k in frozen for k in unexpected) else ""
            parts.append(f"unexpected {_listing(unexpected)}{hint}")
        raise ValueError(f"{source} does not match the model's trainable parameters: " + "; ".join(parts))
    for key, value in state_dict.items():
        if key not in params:
            continue
        param = params[key]
        if tuple(value.shape) != tuple(param.shape):
            rank = ""
            if is_adapter_param_name(key):
                rank = f" (LoRA rank: {value.shape[0 if key.endswith('lora_A') else 1]} in {source}, " \
                       f"{param.shape[0 if key.endswith('lora_A') else 1]} in the model)"
            raise ValueError(f"{source}: {key} has shape {list(value.shape)}, the model's is {list(param.shape)}{rank}")
        param.copy_(value.to(device=param.device, dtype=param.dtype))
    return missing, unexpected


def filter_trainable(sharded_state_dict: Dict, model: nn.Module) -> Dict:
    """The entries of a model's ``sharded_state_dict`` that hold trainable parameters: a
    small distributed checkpoint (resharded across TP/PP on load like any other)."""
    ids = {id(p) for p in unwrap(model).parameters() if p.requires_grad}
    return {k: v for k, v in sharded_state_dict.items() if isinstance(v, ShardedTensor) and id(v.data) in ids}


def trainable_sharded_state_dict(model: nn.Module, prefix: str = "model.") -> Dict:
    return filter_trainable(unwrap(model).sharded_state_dict(prefix=prefix), model)


# ============================================================================ base fingerprint
def _groups():
    if not ps.model_parallel_is_initialized():
        return None, None
    return ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()


def _size(group) -> int:
    return group.size() if group is not None and dist.is_initialized() else 1


def _sum_and_sumsq(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    squares = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(1 << 24):  # bounded float64 temporaries
        c = chunk.to(torch.float64)
        total += c.sum()
        squares += torch.dot(c, c)
    return total, squares


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> Dict:
    """Names, full shapes, dtypes and float64 (sum, sum of squares) of every FROZEN,
    non-adapter parameter: one read of the weights, no copy of them. The same for every
    TP/PP layout of the same weights; collective over TP and PP when they are > 1 (every
    rank must call it)."""
    root = unwrap(model)
    tp_group, pp_group = _groups()
    tp = _size(tp_group)
    entries = [(n, p) for n, p in global_named_parameters(root) if not p.requires_grad and not is_adapter_param_name(n)]
    if any(p.device.type == "meta" for _, p in entries):
        raise ValueError("base_fingerprint needs real weights, the model is on the meta device")
    device = entries[0][1].device if entries else torch.device("cpu")
    stats = torch.zeros(len(entries), 2, dtype=torch.float64, device=device)
    sharded = torch.zeros(len(entries), 1, dtype=torch.float64, device=device)
    tensors = {}
    for i, (name, p) in enumerate(entries):
        stats[i, 0], stats[i, 1] = _sum_and_sumsq(p)
        shape = list(p.shape)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            shape[p.partition_dim] *= tp
            sharded[i] = 1
        tensors[name] = {"shape": shape, "dtype": str(p.dtype).replace("torch.", "")}
    if tp > 1 and entries:
        partial = stats * sharded
        dist.all_reduce(partial, group=tp_group)
        stats = torch.where(sharded.bool(), partial, stats)
    for (name, _), (s, ss) in zip(entries, stats.cpu().tolist()):
        tensors[name].update({"sum": s, "sumsq": ss})
    if _size(pp_group) > 1:
        gathered = [None] * _size(pp_group)
        dist.all_gather_object(gathered, tensors, group=pp_group)
        tensors = {k: v for part in gathered for k, v in part.items()}
    return {"version": FINGERPRINT_VERSION, "tensors": dict(sorted(tensors.items()))}


def check_base_fingerprint(expected: Mapping, actual: Mapping, source: str = "the LoRA checkpoint",
                           rtol: float = 1e-6) -> None:
    """ValueError naming the first difference between the base a LoRA was trained on
    (``expected``) and the model's (``actual``). Sums compare within ``rtol`` of their natural
    scale (summation order differs between TP layouts); a different dtype is a different base."""
    if expected.get("version") != FINGERPRINT_VERSION:
        raise ValueError(f"{source}: base fingerprint version {expected.get('version')!r}, "
                         f"this code reads version {FINGERPRINT_VERSION}")
    saved, ours = expected["tensors"], actual["tensors"]
    only_saved = sorted(set(saved) - set(ours))
    only_ours = sorted(set(ours) - set(saved))
    if only_saved or only_ours:
        parts = ([f"only in its base: {_listing(only_saved)}"] if only_saved else []) + \
                ([f"only in this model's: {_listing(only_ours)}"] if only_ours else [])
        raise ValueError(f"{source} was trained on a different base model (frozen parameters differ: "
                         + "; ".join(parts) + ")")
    for name in saved:
        a, b = saved[name], ours[name]
        if list(a["shape"]) != list(b["shape"]) or a["dtype"] != b["dtype"]:
            raise ValueError(f"{source} was trained on a different base model: {name} is {a['dtype']} "
                             f"{list(a['shape'])} there, {b['dtype']} {list(b['shape'])} here")
        numel = math.prod(a["shape"]) or 1
        scale_sq = max(a["sumsq"], b["sumsq"])
        sum_tol = rtol * math.sqrt(numel * scale_sq) + 1e-30
        if abs(a["sumsq"] - b["sumsq"]) > rtol * scale_sq + 1e-30 or abs(a["sum"] - b["sum"]) > sum_tol:
            raise ValueError(f"{source} was trained on a different base model: {name} differs (sum {a['sum']:.9g} "
                             f"vs {b['sum']:.9g}, sum of squares {a['sumsq']:.9g} vs {b['sumsq']:.9g})")


# ============================================================================ one-file checkpoints
def _check_single_process_layout(what: str) -> None:
    if ps.model_parallel_is_initialized() and (ps.get_tensor_model_parallel_world_size() > 1
                                               or ps.get_pipeline_model_parallel_world_size() > 1):
        raise ValueError(f"{what} handles one TP=1, PP=1 model; at TP/PP > 1 save "
                         "filter_trainable(model.sharded_state_dict(...)) with dist checkpointing")


def _adapter_summary(model: nn.Module) -> Dict[str, Dict]:
    return {name: {"kind": m.lora_kind, "rank": m.lora_rank, "alpha": m.lora_alpha}
            for name, m in lora_modules(model).items()}


def save_lora_checkpoint(model: nn.Module, path: str, lora_config=None, extra: Optional[Mapping] = None) -> str:
    """One safetensors file: the trainable parameters, plus metadata (LoRA config, adapted
    modules, base fingerprint, ``extra``). Written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    _check_single_process_layout("save_lora_checkpoint")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model_class": type(unwrap(model)).__name__,
        "lora_config": lora_config.to_dict() if lora_config is not None else None,
        "adapters": _adapter_summary(model),
        "base_fingerprint": base_fingerprint(model),
        "extra": dict(extra or {}),
    }
    tensors = {k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"LoRA checkpoint {path}: directory {folder} does not exist")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_lora_checkpoint_metadata(path: str) -> Dict:
    """The metadata :func:`save_lora_checkpoint` wrote (e.g. ``lora_config`` to rebuild the
    adapters with ``LoRAConfig.from_dict`` before loading)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA checkpoint {path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"LoRA checkpoint {path}: not a readable safetensors file ({err})") from None
    if raw is None:
        raise ValueError(f"LoRA checkpoint {path}: no '{METADATA_KEY}' metadata (not written by save_lora_checkpoint; "
                         "a diffusers LoRA file loads with load_diffusers_lora)")
    meta = json.loads(raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"LoRA checkpoint {path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return meta


def load_lora_checkpoint(model: nn.Module, path: str, strict: bool = True, check_base: bool = True,
                         rtol: float = 1e-6) -> Dict:
    """Load a file from :func:`save_lora_checkpoint` into a model with the same adapters;
    refuses a model whose frozen base differs (``check_base``). Returns the metadata."""
    from safetensors.torch import load_file

    _check_single_process_layout("load_lora_checkpoint")
    meta = read_lora_checkpoint_metadata(path)
    source = f"LoRA checkpoint {path}"
    saved_class, model_class = meta.get("model_class"), type(unwrap(model)).__name__
    if saved_class != model_class:
        raise ValueError(f"{source} is for a {saved_class}, the model is a {model_class}")
    saved, ours = meta["adapters"], _adapter_summary(model)
    if set(saved) != set(ours):
        only_saved, only_ours = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
        raise ValueError(f"{source} adapts other modules than the model (only in the file: {_listing(only_saved)}; "
                         f"only in the model: {_listing(only_ours)}); apply_lora with its lora_config "
                         f"{meta.get('lora_config')}")
    for name in saved:
        if (saved[name]["rank"], saved[name]["alpha"]) != (ours[name]["rank"], ours[name]["alpha"]):
            raise ValueError(f"{source}: {name} has LoRA rank {saved[name]['rank']} / alpha {saved[name]['alpha']:g}, "
                             f"the model's adapter rank {ours[name]['rank']} / alpha {ours[name]['alpha']:g}")
    if check_base:
        check_base_fingerprint(meta["base_fingerprint"], base_fingerprint(model), source, rtol)
    load_trainable_state_dict(model, load_file(path), strict=strict, source=source)
    return meta


# ============================================================================ counts and memory
def parameter_summary(model: nn.Module, dp_size: int = 1, distributed_optimizer: bool = False,
                      grad_bytes_per_param: int = 4) -> Dict[str, float]:
    """Per-rank parameter counts and the optimizer memory of the trainable ones: Adam's two
    fp32 moments (8 B/param), an fp32 master copy when the parameters are not fp32 (4 B),
    both divided over ``dp_size`` with the distributed optimizer, and the gradient buffer
    (``grad_bytes_per_param``: 4 with grad_reduce_in_fp32). ``*_model`` counts are this
    pipeline stage's parameters unsharded (TP-sharded tensors times the TP size)."""
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    out = {"trainable": 0, "total": 0, "adapter": 0, "trainable_model": 0, "total_model": 0, "master_params": 0}
    for name, p in global_named_parameters(model):
        n = p.numel()
        full = n * tp if getattr(p, "tensor_model_parallel", False) else n
        out["total"] += n
        out["total_model"] += full
        if p.requires_grad:
            out["trainable"] += n
            out["trainable_model"] += full
            out["adapter"] += n if is_adapter_param_name(name) else 0
            out["master_params"] += n if p.dtype != torch.float32 else 0
    shard = dp_size if distributed_optimizer else 1
    out["adam_state_bytes"] = math.ceil(8 * out["trainable"] / shard)
    out["master_param_bytes"] = math.ceil(4 * out.pop("master_params") / shard)
    out["grad_bytes"] = grad_bytes_per_param * out["trainable"]
    out["optimizer_bytes"] = out["adam_state_bytes"] + out["master_param_bytes"] + out["grad_bytes"]
    out["trainable_fraction"] = out["trainable"] / max(out["total"], 1)
    return out


def format_parameter_summary(summary: Mapping) -> str:
    mib = 1 << 20
    return (f"LoRA: {summary['trainable']:,} trainable of {summary['total']:,} parameters on this rank "
            f"({100 * summary['trainable_fraction']:.3f}%; adapters {summary['adapter']:,}); optimizer memory "
            f"{summary['optimizer_bytes'] / mib:.1f} MiB (Adam states {summary['adam_state_bytes'] / mib:.1f}, "
            f"fp32 master {summary['master_param_bytes'] / mib:.1f}, grads {summary['grad_bytes'] / mib:.1f})")
