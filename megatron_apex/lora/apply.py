"""apply_lora: adapters on the modules a LoRAConfig names, everything else frozen.

Names are GLOBAL: a pipeline stage's ``layers.{i}`` is ``layers.{layer_offset + i}``, so
patterns, initialisation, trainable state dicts and exports mean the same thing for every
pipeline layout.
"""

from __future__ import annotations

import re
import zlib
from fnmatch import fnmatchcase
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from megatron_apex.lora.adapters import (
    LoRAMixin,
    _group_size,
    _tp_group_of,
    adapter_kind,
    add_lora_,
    iter_lora_modules,
    kaiming_uniform_A,
)
from megatron_apex.lora.config import PRESETS, LoRAConfig
from megatron_apex.models.common.condition_shift import ConditionShift

_LAYER = re.compile(r"^layers\.(\d+)(?=\.|$)")
_MAX_LISTED = 8


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def global_name(root: nn.Module, local_name: str) -> str:
    offset = getattr(root, "layer_offset", 0) or 0
    if not offset:
        return local_name
    return _LAYER.sub(lambda m: f"layers.{int(m.group(1)) + offset}", local_name)


def global_named_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    root = unwrap(model)
    for name, module in root.named_modules():
        yield global_name(root, name), module


def global_named_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    root = unwrap(model)
    for name, param in root.named_parameters():
        yield global_name(root, name), param


def lora_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{global name: adapted module}, in module order."""
    root = unwrap(model)
    return {global_name(root, name): module for name, module in iter_lora_modules(root)}


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _is_wrapped_for_ddp(model: nn.Module) -> bool:
    return any(cls.__name__ == "DistributedDataParallel" for cls in type(model).__mro__)


def _full_in_features(module: nn.Module, kind: str) -> int:
    in_local = module.weight.shape[1]
    return in_local * _group_size(_tp_group_of(module, kind)) if kind == "row" else in_local


def _init_generator(init_seed: int, name: str) -> torch.Generator:
    # torch's CPU generator keeps only 32 bits of a seed: hash seed and name together
    return torch.Generator().manual_seed(zlib.crc32(f"{init_seed}:{name}".encode()))


def select_modules(model: nn.Module, cfg: LoRAConfig) -> Dict[str, nn.Module]:
    """{global name: module} that ``cfg.targets`` select; ValueError for a target matching nothing."""
    modules = {name: m for name, m in global_named_modules(model) if name}
    candidates = {name: m for name, m in modules.items() if adapter_kind(m) is not None}
    chosen: Dict[str, nn.Module] = {}
    for target, patterns in cfg.target_patterns().items():
        hits = [n for n in candidates if any(fnmatchcase(n, p) for p in patterns)]
        if not hits:
            others = [f"{n} ({type(modules[n]).__name__})" for n in modules if any(fnmatchcase(n, p) for p in patterns)]
            if others:
                raise ValueError(f"--lora-targets {target!r} matches only modules LoRA cannot adapt: "
                                 f"{_listing(others)}; LoRA adapts linears (megatron column/row-parallel, "
                                 "torch.nn.Linear)")
            what = f"preset {target!r} (patterns {list(patterns)})" if target in PRESETS else f"pattern {target!r}"
            raise ValueError(f"--lora-targets {what} matches no module of {type(unwrap(model)).__name__}; "
                             f"adaptable modules: {_listing(list(candidates))}; presets: {', '.join(PRESETS)}")
        for name in hits:
            chosen[name] = candidates[name]
    return chosen


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> List[str]:
    """Add adapters to the modules ``cfg`` selects, freeze every other parameter except the
    trainable extras (see LoRAConfig); returns the adapted modules' global names.

    Call it after loading the base weights and BEFORE building megatron's DDP / optimizer
    (they register only the parameters that require grad at construction)."""
    cfg.validate()
    if _is_wrapped_for_ddp(model):
        raise ValueError("apply_lora must run before the model is wrapped in DistributedDataParallel: DDP and the "
                         "optimizer register only the parameters that exist and require grad when they are built")
    root = unwrap(model)
    chosen = select_modules(root, cfg)
    twice = [n for n, m in chosen.items() if isinstance(m, LoRAMixin)]
    if twice:
        raise ValueError(f"--lora-targets select modules that already have a LoRA adapter: {_listing(twice)}")
    for name, module in chosen.items():
        kind = adapter_kind(module)
        A_full = kaiming_uniform_A(cfg.rank, _full_in_features(module, kind), _init_generator(cfg.init_seed, name))
        add_lora_(module, cfg.rank, cfg.alpha, cfg.dropout, A_full, name=name)
    set_trainable_(root, cfg)
    return list(chosen)


def set_trainable_(model: nn.Module, cfg: LoRAConfig) -> List[str]:
    """Freeze everything, then unfreeze adapters and the extras ``cfg`` names; returns the
    global names of the trainable parameters."""
    root = unwrap(model)
    for p in root.parameters():
        p.requires_grad_(False)
    for _, module in iter_lora_modules(root):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for name, module in root.named_modules():
        if cfg.train_condition_shift and isinstance(module, ConditionShift):
            for p in module.parameters():  # none unless the shift is learnable
                p.requires_grad_(True)
        if cfg.train_target_time_embedder and name.rsplit(".", 1)[-1] == "target_time_embedder":
            for p in module.parameters():
                p.requires_grad_(True)
    params = dict(global_named_parameters(root))
    for pattern in cfg.extra_trainable:
        hits = [n for n in params if fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"--lora-extra-trainable {pattern!r} matches no parameter; parameters include: "
                             f"{_listing([n for n in params if not n.endswith(('lora_A', 'lora_B'))])}")
        for n in hits:
            params[n].requires_grad_(True)
    return [n for n, p in params.items() if p.requires_grad]
