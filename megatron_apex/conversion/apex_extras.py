"""What every model family's conversion does the same way: the APEX parameters diffusers has
no place for (the second timestep embedder, the condition shift) and loading a converted
state dict into a one-stage TP=1 model."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch

_TARGET_KEYS = {f"target_time_embedder.linear_{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}


def shift_is_learnable(config) -> bool:
    if config.shift_learnable is None:
        return config.shift_kind != "scalar"
    return bool(config.shift_learnable)


def fill_apex_extras(sd: Dict[str, torch.Tensor], missing, config, shift_dim: int, embedder_hf: str,
                     source: str) -> Dict[str, torch.Tensor]:
    """Fill the APEX keys a diffusers checkpoint lacks: the target-time embedder starts as a copy
    of the time embedder (its output layer zeroed with target_time_init="zero"), the condition
    shift at its configured initial value."""
    missing = set(missing)
    if missing & _TARGET_KEYS:
        if not _TARGET_KEYS <= missing:
            raise ValueError(f"{source} has only part of {embedder_hf}")
        for key in _TARGET_KEYS:
            sd[key] = sd[key.replace("target_time_embedder", "time_embedder")].clone()
        if config.target_time_init == "zero":
            for p in ("weight", "bias"):
                sd[f"target_time_embedder.linear_2.{p}"] = torch.zeros_like(sd[f"target_time_embedder.linear_2.{p}"])
        missing -= _TARGET_KEYS
    if missing:
        from megatron_apex.objectives.apex import ConditionShift

        fresh = ConditionShift(shift_dim, kind=config.shift_kind, a=config.shift_a, b=config.shift_b,
                               learnable=config.shift_learnable).state_dict()
        for key in sorted(missing):
            sd[key] = fresh[key.split(".", 1)[1]].to(config.torch_dtype)
    return sd


def load_converted_state_dict(model, hf_sd: Mapping[str, torch.Tensor],
                              hf_to_megatron: Callable[..., Dict[str, torch.Tensor]]) -> None:
    """Convert with ``hf_to_megatron`` and load into a TP=1, single-stage model (strict). For
    TP > 1, load ``shard_for_tp(hf_to_megatron(...), <family table>, ...)`` instead."""
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
