"""Sana: diffusers ``SanaTransformer2DModel`` <-> ``SanaModel`` names, for the generic engine.

Besides fusing the self-attention's q/k/v per head, the table turns the GLUMBConv 1x1
convolutions into linears and interleaves the [x; gate] halves of ``conv_inverted`` and
``conv_depth`` (see ``megatron_apex.models.sana.layers.GLUMBConv``).

The APEX extras travel both ways: the any-step target-time embedder as
``time_embed_2.emb.timestep_embedder.*`` (named after ``time_embed.emb.timestep_embedder``,
as the authors' Qwen-Image release names its copy ``time_text_embed_2``) and a learnable
condition shift as ``condition_shift.{A,b}``. A diffusers checkpoint without
``time_embed_2`` gets it filled per ``--target-time-init`` (copy, or zero last linear).
"""

from __future__ import annotations

from typing import Dict, List, Mapping

import torch

from megatron_apex.conversion.apex_extras import fill_apex_extras, load_converted_state_dict, shift_is_learnable
from megatron_apex.conversion.engine import ParamRule, hf_to_ours, ours_to_hf

COLUMN, ROW = 0, 1
_BLOCK = "transformer_blocks.{i}."
_LAYER = "layers.{i}."
TARGET_EMBEDDER_HF = "time_embed_2.emb.timestep_embedder"


def _linear(ours: str, hf: str, tp_split_dim=None, optional=False, bias=True) -> List[ParamRule]:
    """weight (+ bias) of a linear; a row-parallel linear's bias is replicated."""
    rules = [ParamRule(f"{ours}.weight", (f"{hf}.weight",), tp_split_dim=tp_split_dim, optional=optional)]
    if bias:
        bias_dim = tp_split_dim if tp_split_dim == COLUMN else None
        rules.append(ParamRule(f"{ours}.bias", (f"{hf}.bias",), tp_split_dim=bias_dim, optional=optional))
    return rules


def sana_mapping_table(config) -> List[ParamRule]:
    """The table for a model built from ``config`` (extras present only where the config has them)."""
    table: List[ParamRule] = []
    table += _linear("patch_embed", "patch_embed.proj")
    for j in (1, 2):
        table += _linear(f"time_embedder.linear_{j}", f"time_embed.emb.timestep_embedder.linear_{j}")
    if config.target_time_embedder:
        for j in (1, 2):
            table += _linear(f"target_time_embedder.linear_{j}", f"{TARGET_EMBEDDER_HF}.linear_{j}", optional=True)
    # adaLN-single: the six chunks are contiguous row blocks, gathered back in order under TP.
    table += _linear("time_modulation", "time_embed.linear", COLUMN)
    for j in (1, 2):
        table += _linear(f"caption_projection.linear_{j}", f"caption_projection.linear_{j}")
    table += [ParamRule("caption_norm.weight", ("caption_norm.weight",))]
    if shift_is_learnable(config):
        table += [ParamRule(f"condition_shift.{p}", (f"condition_shift.{p}",), optional=True) for p in ("A", "b")]

    table += [ParamRule(_LAYER + "modulation.weight", (_BLOCK + "scale_shift_table",))]
    a, h = _LAYER + "attention.", _BLOCK + "attn1."
    params = ("weight", "bias") if config.attention_bias else ("weight",)
    table += [ParamRule(f"{a}linear_qkv.{p}", (f"{h}to_q.{p}", f"{h}to_k.{p}", f"{h}to_v.{p}"),
                        transform="qkv_per_head", tp_split_dim=COLUMN) for p in params]
    table += _linear(a + "linear_proj", h + "to_out.0", ROW)
    c, h = _LAYER + "cross_attention.", _BLOCK + "attn2."
    for ours, hf in (("linear_q", "to_q"), ("linear_k", "to_k"), ("linear_v", "to_v")):
        table += _linear(c + ours, h + hf, COLUMN)
    table += _linear(c + "linear_proj", h + "to_out.0", ROW)
    m, f = _LAYER + "mlp.", _BLOCK + "ff."
    table += [
        ParamRule(m + "linear_fc1.weight", (f + "conv_inverted.weight",), "conv1x1_glu_interleave", COLUMN),
        ParamRule(m + "linear_fc1.bias", (f + "conv_inverted.bias",), "glu_interleave", COLUMN),
        ParamRule(m + "depthwise.weight", (f + "conv_depth.weight",), "glu_interleave", COLUMN),
        ParamRule(m + "depthwise.bias", (f + "conv_depth.bias",), "glu_interleave", COLUMN),
        ParamRule(m + "linear_fc2.weight", (f + "conv_point.weight",), "conv1x1", ROW),
    ]

    # SanaModulatedNorm: (shift, scale) = scale_shift_table + e; the table keeps that order.
    table += [ParamRule("final_modulation.weight", ("scale_shift_table",))]
    table += _linear("proj_out", "proj_out")
    return table


def _ctx(config) -> Dict:
    return {"head_dim": config.attention_head_dim}


def transform_context(config) -> Dict:
    """What the table's transforms need to know about the model (the QKV head size)."""
    return _ctx(config)


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], config, source: str = "the diffusers state dict",
                   lazy: bool = False) -> Mapping[str, torch.Tensor]:
    """diffusers state dict -> ours (TP=1, all layers), APEX extras filled where absent.
    ``lazy``: a ``LazyStateDict`` that reads and converts each tensor when it is asked for
    (the extras, small, are filled eagerly)."""
    table = sana_mapping_table(config)
    sd, missing = hf_to_ours(hf_sd, table, config.num_layers, _ctx(config), source=source, lazy=lazy)
    shift_dim = config.caption_channels if config.shift_site == "input" else config.hidden_size
    return fill_apex_extras(sd, missing, config, shift_dim, TARGET_EMBEDDER_HF, source)


def megatron_to_hf(sd: Mapping[str, torch.Tensor], config, source: str = "the model state dict") -> Dict:
    """Ours (TP=1, all layers) -> diffusers names, APEX extras included."""
    return ours_to_hf(sd, sana_mapping_table(config), config.num_layers, _ctx(config), source=source)


def load_diffusers_state_dict(model, hf_sd: Mapping[str, torch.Tensor]) -> None:
    """Convert and load into a TP=1, single-stage model (strict); see
    apex_extras.load_converted_state_dict."""
    load_converted_state_dict(model, hf_sd, hf_to_megatron)


# ----------------------------------------------------------------------------- config.json
DIFFUSERS_CLASS = "SanaTransformer2DModel"
# SanaConfig fields that config.json determines; every other field is an APEX/run option.
DIFFUSERS_ARCH_FIELDS = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                         "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim",
                         "caption_channels", "mlp_ratio", "attention_bias", "sample_size", "patch_size", "norm_eps")
# diffusers options SanaModel does not implement, with the value it computes as.
_DIFFUSERS_FIXED = {"guidance_embeds": False, "qk_norm": None, "interpolation_scale": None,
                    "norm_elementwise_affine": False, "timestep_scale": 1.0}
_WHY = {
    "guidance_embeds": "a guidance-distilled model (Sana-Sprint style guidance embedder)",
    "qk_norm": "q/k normalisation in the attention",
    "interpolation_scale": "sin-cos positional embeddings (Sana's 2K/4K models)",
    "norm_elementwise_affine": "affine block norms",
    "timestep_scale": "a timestep scale other than 1 (pipelines multiply 1000*sigma by it)",
}
# Ignored (no effect on the weights or on inference): written back as diffusers' defaults.
_DIFFUSERS_IGNORED = {"dropout": 0.0, "guidance_embeds_scale": 0.1}


def config_from_diffusers(diffusers_config: Mapping, **overrides):
    """``SanaConfig`` from a diffusers ``config.json`` dict; ``overrides`` set APEX/other fields."""
    from megatron_apex.models.sana.config import SanaConfig

    for key, needed in _DIFFUSERS_FIXED.items():
        value = diffusers_config.get(key, needed)
        if (bool(value) if needed is False else value != needed):
            raise ValueError(f"diffusers config sets {key}={value!r} ({_WHY[key]}), which SanaModel "
                             f"does not implement (it needs {key}={needed!r})")
    fields = {k: diffusers_config[k] for k in DIFFUSERS_ARCH_FIELDS if k in diffusers_config}
    if fields.get("out_channels") is None:
        fields["out_channels"] = fields.get("in_channels", SanaConfig.in_channels)
    fields.update(overrides)
    return SanaConfig(**fields).validate()


def config_to_diffusers(config) -> Dict:
    """diffusers' ``config.json`` for a ``SanaConfig`` (architecture fields only; the APEX
    fields have no diffusers counterpart)."""
    out = {"_class_name": DIFFUSERS_CLASS}
    for key in DIFFUSERS_ARCH_FIELDS:
        out[key] = getattr(config, key)
    out.update(_DIFFUSERS_FIXED)
    out.update(_DIFFUSERS_IGNORED)
    return out
