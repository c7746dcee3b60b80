"""Qwen-Image: diffusers ``QwenImageTransformer2DModel`` <-> ``QwenImageModel`` names.

Besides diffusers' keys, the APEX extras travel both ways: the any-step target-time embedder
as ``time_text_embed_2.timestep_embedder.*`` (the authors' release name) and a learnable
condition shift as ``condition_shift.{A,b}``. A diffusers checkpoint without
``time_text_embed_2`` gets it filled per ``--target-time-init`` (copy, or zero last linear).
"""

from __future__ import annotations

from typing import Dict, List, Mapping

import torch

from megatron_apex.conversion.apex_extras import fill_apex_extras, load_converted_state_dict, shift_is_learnable
from megatron_apex.conversion.engine import ParamRule, hf_to_ours, ours_to_hf

COLUMN, ROW = 0, 1
_BLOCK = "transformer_blocks.{i}."
_LAYER = "layers.{i}."


def _linear(ours: str, hf: str, tp_split_dim=None, optional=False) -> List[ParamRule]:
    """weight + bias of a linear; a row-parallel linear's bias is replicated."""
    bias_dim = tp_split_dim if tp_split_dim == COLUMN else None
    return [
        ParamRule(f"{ours}.weight", (f"{hf}.weight",), tp_split_dim=tp_split_dim, optional=optional),
        ParamRule(f"{ours}.bias", (f"{hf}.bias",), tp_split_dim=bias_dim, optional=optional),
    ]


def _qkv(ours: str, hf_q: str, hf_k: str, hf_v: str) -> List[ParamRule]:
    return [
        ParamRule(f"{ours}.{p}", (f"{hf_q}.{p}", f"{hf_k}.{p}", f"{hf_v}.{p}"),
                  transform="qkv_per_head", tp_split_dim=COLUMN)
        for p in ("weight", "bias")
    ]


def qwen_image_mapping_table(config) -> List[ParamRule]:
    """The table for a model built from ``config`` (extras present only where the config has them)."""
    table: List[ParamRule] = []
    table += _linear("img_in", "img_in")
    table += [ParamRule("txt_norm.weight", ("txt_norm.weight",))]
    table += _linear("txt_in", "txt_in")
    for j in (1, 2):
        table += _linear(f"time_embedder.linear_{j}", f"time_text_embed.timestep_embedder.linear_{j}")
    if config.target_time_embedder:
        for j in (1, 2):
            table += _linear(f"target_time_embedder.linear_{j}",
                             f"time_text_embed_2.timestep_embedder.linear_{j}", optional=True)
    if shift_is_learnable(config):
        table += [ParamRule(f"condition_shift.{p}", (f"condition_shift.{p}",), optional=True) for p in ("A", "b")]

    a = _LAYER + "attention."
    h = _BLOCK + "attn."
    table += _linear(_LAYER + "img_modulation.linear", _BLOCK + "img_mod.1", COLUMN)
    table += _linear(_LAYER + "txt_modulation.linear", _BLOCK + "txt_mod.1", COLUMN)
    table += _qkv(a + "linear_qkv", h + "to_q", h + "to_k", h + "to_v")
    table += _qkv(a + "linear_added_qkv", h + "add_q_proj", h + "add_k_proj", h + "add_v_proj")
    for ours, hf in (("q_layernorm", "norm_q"), ("k_layernorm", "norm_k"),
                     ("added_q_layernorm", "norm_added_q"), ("added_k_layernorm", "norm_added_k")):
        table += [ParamRule(f"{a}{ours}.weight", (f"{h}{hf}.weight",))]
    table += _linear(a + "linear_proj", h + "to_out.0", ROW)
    table += _linear(a + "linear_added_proj", h + "to_add_out", ROW)
    for stream in ("img", "txt"):
        table += _linear(f"{_LAYER}{stream}_mlp.linear_fc1", f"{_BLOCK}{stream}_mlp.net.0.proj", COLUMN)
        table += _linear(f"{_LAYER}{stream}_mlp.linear_fc2", f"{_BLOCK}{stream}_mlp.net.2", ROW)

    # AdaLayerNormContinuous chunks are (scale, shift); final_modulation keeps that order.
    table += _linear("final_modulation.linear", "norm_out.linear", COLUMN)
    table += _linear("proj_out", "proj_out")
    return table


def _ctx(config) -> Dict:
    return {"head_dim": config.attention_head_dim}


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], config, source: str = "the diffusers state dict",
                   lazy: bool = False) -> Mapping[str, torch.Tensor]:
    """diffusers state dict -> ours (TP=1, all layers), APEX extras filled where absent.
    ``lazy``: a ``LazyStateDict`` that reads and converts each tensor when it is asked for
    (the extras, small, are filled eagerly)."""
    table = qwen_image_mapping_table(config)
    sd, missing = hf_to_ours(hf_sd, table, config.num_layers, _ctx(config), source=source, lazy=lazy)
    shift_dim = config.joint_attention_dim if config.shift_site == "input" else config.hidden_size
    return fill_apex_extras(sd, missing, config, shift_dim, "time_text_embed_2", source)


def megatron_to_hf(sd: Mapping[str, torch.Tensor], config, source: str = "the model state dict") -> Dict:
    """Ours (TP=1, all layers) -> diffusers names, APEX extras included."""
    return ours_to_hf(sd, qwen_image_mapping_table(config), config.num_layers, _ctx(config), source=source)


def load_diffusers_state_dict(model, hf_sd: Mapping[str, torch.Tensor]) -> None:
    """Convert and load into a TP=1, single-stage model (strict); see
    apex_extras.load_converted_state_dict."""
    load_converted_state_dict(model, hf_sd, hf_to_megatron)


_DIFFUSERS_ARCH = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                   "num_attention_heads", "joint_attention_dim", "axes_dims_rope")
_DIFFUSERS_UNSUPPORTED = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


def config_from_diffusers(diffusers_config: Mapping, **overrides):
    """``QwenImageConfig`` from a diffusers ``config.json`` dict; ``overrides`` set APEX/other fields."""
    from megatron_apex.models.qwen_image.config import QwenImageConfig

    for key in _DIFFUSERS_UNSUPPORTED:
        if diffusers_config.get(key):
            raise ValueError(f"diffusers config sets {key}=True, which QwenImageModel does not implement")
    fields = {k: diffusers_config[k] for k in _DIFFUSERS_ARCH if k in diffusers_config}
    if fields.get("out_channels") is None and "in_channels" in fields:
        fields["out_channels"] = fields["in_channels"]
    if "axes_dims_rope" in fields:
        fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
    fields.update(overrides)
    return QwenImageConfig(**fields).validate()


# ----------------------------------------------------------------------------- for tools/convert_hf.py
DIFFUSERS_CLASS = "QwenImageTransformer2DModel"
# QwenImageConfig fields that config.json determines; every other field is an APEX/run option.
DIFFUSERS_ARCH_FIELDS = _DIFFUSERS_ARCH
# Architecture that diffusers hard-codes: a model that differs has no diffusers equivalent.
_DIFFUSERS_FIXED = {"rope_theta": 10000.0, "mlp_ratio": 4, "norm_eps": 1e-6, "timestep_channels": 256}


def transform_context(config) -> Dict:
    """What the table's transforms need to know about the model (the QKV head size)."""
    return _ctx(config)


def config_to_diffusers(config) -> Dict:
    """diffusers' ``config.json`` for a ``QwenImageConfig`` (architecture fields only; the
    APEX fields have no diffusers counterpart)."""
    for key, value in _DIFFUSERS_FIXED.items():
        if getattr(config, key) != value:
            raise ValueError(f"the model has {key}={getattr(config, key)!r}; diffusers' {DIFFUSERS_CLASS} "
                             f"hard-codes {value!r}, so it has no diffusers equivalent")
    out = {"_class_name": DIFFUSERS_CLASS}
    for key in _DIFFUSERS_ARCH:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    out.update({key: False for key in _DIFFUSERS_UNSUPPORTED})
    return out
