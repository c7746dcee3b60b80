"""Sana: the presets, ``SanaModel`` and its layer spec, and the mapping to diffusers'
``SanaTransformer2DModel``.

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

from typing import Dict, List, Mapping, Tuple

import torch

from megatron_apex.families.base import ModelFamily
from megatron_apex.families.mapping_rules import COLUMN, ROW, ParamRule, linear_rules, shift_is_learnable
from megatron_apex.models.sana.config import SanaConfig


# ============================================================================ presets
def _sana_1600m() -> SanaConfig:
    # diffusers' SanaTransformer2DModel defaults: Sana 1.6B (1024 px, DC-AE f32c32 latents,
    # Gemma-2-2B captions).
    return SanaConfig()


def _sana_600m() -> SanaConfig:
    # Sana 0.6B as diffusers' scripts/convert_sana_to_diffusers.py builds it.
    return SanaConfig(num_attention_heads=36, attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                      cross_attention_head_dim=72, cross_attention_dim=1152)


def _sana_tiny() -> SanaConfig:
    # The CPU job's data (28x28 grey images, 384-d MiniLM token states): 4x4 patches -> the
    # same 7x7 token grid as qwen-image-tiny, D = 4 heads x 32 = 128, cross-attention 4 x 32,
    # 3 layers (1.1 M parameters). Measured on two CPU cores at batch 64: a `released` APEX
    # iteration as fast as qwen-image-tiny's (1.24 it/s each, same machine and load; 4 layers:
    # 0.95 it/s). Fewer parameters than qwen-image-tiny at equal cost because every Sana
    # weight acts on the image tokens, while half of Qwen-Image's act on the 16 text tokens.
    return SanaConfig(in_channels=1, out_channels=1, num_attention_heads=4, attention_head_dim=32, num_layers=3,
                      num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128,
                      caption_channels=384, sample_size=7, patch_size=4)


def _sana_tiny_test() -> SanaConfig:
    # Unit tests: seconds on two CPU cores.
    return SanaConfig(in_channels=1, out_channels=1, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                      num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                      caption_channels=24, sample_size=4, patch_size=2)


PRESETS = {
    "sana-0.6b": _sana_600m,
    "sana-1.6b": _sana_1600m,
    "sana-tiny": _sana_tiny,
    "sana-tiny-test": _sana_tiny_test,
}


# ============================================================================ model
def _model_class():
    from megatron_apex.models.sana.model import SanaModel  # megatron-core: only to build

    return SanaModel


def _layer_spec(backend: str = "auto", attention_backend: str = "auto"):
    from megatron_apex.models.sana.layer_spec import get_sana_layer_spec  # megatron-core

    return get_sana_layer_spec(backend, attention_backend=attention_backend)


# ============================================================================ mapping table
_BLOCK = "transformer_blocks.{i}."
_LAYER = "layers.{i}."
TARGET_EMBEDDER_HF = "time_embed_2.emb.timestep_embedder"


def sana_mapping_table(config) -> List[ParamRule]:
    """The table for a model built from ``config`` (extras present only where the config has them)."""
    table: List[ParamRule] = []
    table += linear_rules("patch_embed", "patch_embed.proj")
    for j in (1, 2):
        table += linear_rules(f"time_embedder.linear_{j}", f"time_embed.emb.timestep_embedder.linear_{j}")
    if config.target_time_embedder:
        for j in (1, 2):
            table += linear_rules(f"target_time_embedder.linear_{j}", f"{TARGET_EMBEDDER_HF}.linear_{j}", optional=True)
    # adaLN-single: the six chunks are contiguous row blocks, gathered back in order under TP.
    table += linear_rules("time_modulation", "time_embed.linear", COLUMN)
    for j in (1, 2):
        table += linear_rules(f"caption_projection.linear_{j}", f"caption_projection.linear_{j}")
    table += [ParamRule("caption_norm.weight", ("caption_norm.weight",))]
    if shift_is_learnable(config):
        table += [ParamRule(f"condition_shift.{p}", (f"condition_shift.{p}",), optional=True) for p in ("A", "b")]

    table += [ParamRule(_LAYER + "modulation.weight", (_BLOCK + "scale_shift_table",))]
    a, h = _LAYER + "attention.", _BLOCK + "attn1."
    params = ("weight", "bias") if config.attention_bias else ("weight",)
    table += [ParamRule(f"{a}linear_qkv.{p}", (f"{h}to_q.{p}", f"{h}to_k.{p}", f"{h}to_v.{p}"),
                        transform="qkv_per_head", tp_split_dim=COLUMN) for p in params]
    table += linear_rules(a + "linear_proj", h + "to_out.0", ROW)
    c, h = _LAYER + "cross_attention.", _BLOCK + "attn2."
    for ours, hf in (("linear_q", "to_q"), ("linear_k", "to_k"), ("linear_v", "to_v")):
        table += linear_rules(c + ours, h + hf, COLUMN)
    table += linear_rules(c + "linear_proj", h + "to_out.0", ROW)
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
    table += linear_rules("proj_out", "proj_out")
    return table


def transform_context(config) -> Dict:
    """What the table's transforms need to know about the model (the QKV head size)."""
    return {"head_dim": config.attention_head_dim}


def shift_dim(config) -> int:
    return config.caption_channels if config.shift_site == "input" else config.hidden_size


# ============================================================================ config.json
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


def config_from_diffusers(diffusers_config: Mapping, **overrides) -> SanaConfig:
    """``SanaConfig`` from a diffusers ``config.json`` dict; ``overrides`` set APEX/other fields."""
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


# ============================================================================ diffusers reference
def load_reference(path: str) -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()


def reference_forward(hf_model, config, x, t, ctx, mask) -> torch.Tensor:
    # Sana's pipelines pass timestep = 1000 * sigma; our t is sigma (SanaModel docstring).
    return hf_model(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask,
                    timestep=t * 1000.0, return_dict=False)[0]


def default_latent_grid(config, vae_scale_factor: int) -> Tuple[int, int]:
    return config.sample_size, config.sample_size  # SanaPipeline: sample_size x vae_scale_factor px


SANA = ModelFamily(
    name="sana", config_class=SanaConfig, presets=PRESETS, default_model_name="sana-1.6b",
    model_class=_model_class, layer_spec_builder=_layer_spec,
    diffusers_class=DIFFUSERS_CLASS, arch_fields=DIFFUSERS_ARCH_FIELDS,
    config_from_diffusers=config_from_diffusers, config_to_diffusers=config_to_diffusers,
    mapping_table=sana_mapping_table, transform_context=transform_context,
    target_embedder_hf=TARGET_EMBEDDER_HF, shift_dim=shift_dim,
    load_reference=load_reference, reference_forward=reference_forward, default_latent_grid=default_latent_grid,
    pipeline_fields=("in_channels", "out_channels", "caption_channels"),
)
