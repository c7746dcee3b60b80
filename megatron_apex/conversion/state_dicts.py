"""A family's whole diffusers state dict <-> ours (TP=1, every layer), through its mapping
table, and what every family's conversion does the same way: the APEX parameters diffusers
has no place for (the second timestep embedder, the condition shift) filled in when a
diffusers checkpoint lacks them, and loading a converted state dict into a one-stage model."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, MutableMapping, Optional

import torch

from megatron_apex.conversion.engine import LazyStateDict, hf_to_ours, ours_to_hf
from megatron_apex.families import ModelFamily, family_of_config
from megatron_apex.models.common.condition_shift import ConditionShift

_TARGET_KEYS = {f"target_time_embedder.linear_{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}


def _put(sd: MutableMapping, key: str, make: Callable[[], torch.Tensor]) -> None:
    """Store ``make()`` under ``key``; a lazy state dict keeps the recipe instead (a streaming
    import then holds no extra tensors either)."""
    if isinstance(sd, LazyStateDict):
        sd.set_recipe(key, make)
    else:
        sd[key] = make()


def _fresh_shift(config, shift_dim: int) -> Dict[str, torch.Tensor]:
    return ConditionShift(shift_dim, kind=config.shift_kind, a=config.shift_a, b=config.shift_b,
                          learnable=config.shift_learnable).state_dict()


def fill_apex_extras(sd: MutableMapping, missing, config, shift_dim: int, embedder_hf: str,
                     source: str) -> MutableMapping:
    """Fill the APEX keys a diffusers checkpoint lacks: the target-time embedder starts as a copy
    of the time embedder (its output layer zeroed with target_time_init="zero"), the condition
    shift at its configured initial value."""
    missing = set(missing)
    if missing & _TARGET_KEYS:
        if not _TARGET_KEYS <= missing:
            raise ValueError(f"{source} has only part of {embedder_hf}")
        for key in sorted(_TARGET_KEYS):
            src = key.replace("target_time_embedder", "time_embedder")
            if config.target_time_init == "zero" and key.startswith("target_time_embedder.linear_2."):
                _put(sd, key, lambda src=src: torch.zeros_like(sd[src]))
            else:
                _put(sd, key, lambda src=src: sd[src].clone())
        missing -= _TARGET_KEYS
    for key in sorted(missing):
        name = key.split(".", 1)[1]
        _put(sd, key, lambda name=name: _fresh_shift(config, shift_dim)[name].to(config.torch_dtype))
    return sd


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], config, source: str = "the diffusers state dict",
                   lazy: bool = False, family: Optional[ModelFamily] = None) -> Mapping[str, torch.Tensor]:
    """diffusers state dict -> ours (TP=1, all layers), APEX extras filled where absent.
    ``lazy``: a ``LazyStateDict`` that reads and converts each tensor when it is asked for
    (the extras, small, are filled eagerly). ``family``: the config's registered one by default."""
    family = family or family_of_config(config)
    sd, missing = hf_to_ours(hf_sd, family.mapping_table(config), family.num_layers(config),
                             family.transform_context(config), source=source, lazy=lazy)
    return fill_apex_extras(sd, missing, config, family.shift_dim(config), family.target_embedder_hf, source)


def megatron_to_hf(sd: Mapping[str, torch.Tensor], config, source: str = "the model state dict",
                   family: Optional[ModelFamily] = None) -> Dict[str, torch.Tensor]:
    """Ours (TP=1, all layers) -> diffusers names, APEX extras included."""
    family = family or family_of_config(config)
    return ours_to_hf(sd, family.mapping_table(config), family.num_layers(config), family.transform_context(config),
                      source=source)


def load_diffusers_state_dict(model, hf_sd: Mapping[str, torch.Tensor]) -> None:
    """Convert and load into a TP=1, single-stage model (strict). For TP > 1, load
    ``shard_for_tp(hf_to_megatron(...), <family table>, ...)`` instead."""
    config = model.model_config
    if model.config.tensor_model_parallel_size != 1:
        raise ValueError("load_diffusers_state_dict loads TP=1 models; shard the converted state dict "
                         "with conversion.shard_for_tp for --tensor-model-parallel-size > 1")
    if not (model.pre_process and model.post_process and model.num_local_layers == config.num_layers):
        raise ValueError("load_diffusers_state_dict loads a single-stage model; select this stage's keys "
                         "from hf_to_megatron(...) for pipeline stages")
    result = model.load_state_dict(hf_to_megatron(hf_sd, config), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"loading converted weights: missing {missing}, unexpected {result.unexpected_keys}")
