"""Qwen-Image: the presets, ``QwenImageModel`` and its layer spec, and the mapping to diffusers'
``QwenImageTransformer2DModel``.

Besides diffusers' keys, the APEX extras travel both ways: the any-step target-time embedder
as ``time_text_embed_2.timestep_embedder.*`` (the authors' release name) and a learnable
condition shift as ``condition_shift.{A,b}``. A diffusers checkpoint without
``time_text_embed_2`` gets it filled per ``--target-time-init`` (copy, or zero last linear).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from megatron_apex.families.base import ModelFamily
from megatron_apex.families.mapping_rules import COLUMN, ROW, ParamRule, linear_rules, shift_is_learnable
from megatron_apex.models.qwen_image.config import QwenImageConfig


# ============================================================================ presets
def _qwen_image_20b() -> QwenImageConfig:
    # diffusers' QwenImageTransformer2DModel defaults (20.43 B parameters).
    return QwenImageConfig()


def _qwen_image_tiny() -> QwenImageConfig:
    # The default CPU job: 28x28 grey images (1 channel, 4x4 patches -> 49 image tokens) and
    # 384-d MiniLM token states; D = 4 heads x 24 = 96, 4 layers (1.5 M parameters). About 4.5
    # flow-matching and 1.3 APEX iterations/s at batch 64 on two CPU cores.
    return QwenImageConfig(
        patch_size=4, in_channels=16, out_channels=1, num_layers=4, attention_head_dim=24,
        num_attention_heads=4, joint_attention_dim=384, axes_dims_rope=(8, 8, 8),
    )


def _qwen_image_tiny_p2() -> QwenImageConfig:
    # 2x2 patches (196 image tokens) as the production model uses, D = 4 x 32: ~4x the cost.
    return _qwen_image_tiny().replace(patch_size=2, in_channels=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12))


def _qwen_image_tiny_fast() -> QwenImageConfig:
    # Budget config: D = 2 x 24, 3 layers.
    return _qwen_image_tiny().replace(num_attention_heads=2, num_layers=3)


def _qwen_image_tiny_test() -> QwenImageConfig:
    # Unit tests: seconds on two CPU cores.
    return QwenImageConfig(
        patch_size=2, in_channels=4, out_channels=1, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
    )


PRESETS = {
    "qwen-image-20b": _qwen_image_20b,
    "qwen-image-tiny": _qwen_image_tiny,
    "qwen-image-tiny-p2": _qwen_image_tiny_p2,
    "qwen-image-tiny-fast": _qwen_image_tiny_fast,
    "qwen-image-tiny-test": _qwen_image_tiny_test,
}


# ============================================================================ model
def _model_class():
    from megatron_apex.models.qwen_image.model import QwenImageModel  # megatron-core: only to build

    return QwenImageModel


def _layer_spec(backend: str = "auto", attention_backend: str = "auto"):
    from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec  # megatron-core

    return get_qwen_image_layer_spec(backend, attention_backend=attention_backend)


# ============================================================================ mapping table
_BLOCK = "transformer_blocks.{i}."
_LAYER = "layers.{i}."
TARGET_EMBEDDER_HF = "time_text_embed_2"


def _qkv(ours: str, hf_q: str, hf_k: str, hf_v: str) -> List[ParamRule]:
    return [
        ParamRule(f"{ours}.{p}", (f"{hf_q}.{p}", f"{hf_k}.{p}", f"{hf_v}.{p}"),
                  transform="qkv_per_head", tp_split_dim=COLUMN)
        for p in ("weight", "bias")
    ]


def qwen_image_mapping_table(config) -> List[ParamRule]:
    """The table for a model built from ``config`` (extras present only where the config has them)."""
    table: List[ParamRule] = []
    table += linear_rules("img_in", "img_in")
    table += [ParamRule("txt_norm.weight", ("txt_norm.weight",))]
    table += linear_rules("txt_in", "txt_in")
    for j in (1, 2):
        table += linear_rules(f"time_embedder.linear_{j}", f"time_text_embed.timestep_embedder.linear_{j}")
    if config.target_time_embedder:
        for j in (1, 2):
            table += linear_rules(f"target_time_embedder.linear_{j}",
                                  f"{TARGET_EMBEDDER_HF}.timestep_embedder.linear_{j}", optional=True)
    if shift_is_learnable(config):
        table += [ParamRule(f"condition_shift.{p}", (f"condition_shift.{p}",), optional=True) for p in ("A", "b")]

    a = _LAYER + "attention."
    h = _BLOCK + "attn."
    table += linear_rules(_LAYER + "img_modulation.linear", _BLOCK + "img_mod.1", COLUMN)
    table += linear_rules(_LAYER + "txt_modulation.linear", _BLOCK + "txt_mod.1", COLUMN)
    table += _qkv(a + "linear_qkv", h + "to_q", h + "to_k", h + "to_v")
    table += _qkv(a + "linear_added_qkv", h + "add_q_proj", h + "add_k_proj", h + "add_v_proj")
    for ours, hf in (("q_layernorm", "norm_q"), ("k_layernorm", "norm_k"),
                     ("added_q_layernorm", "norm_added_q"), ("added_k_layernorm", "norm_added_k")):
        table += [ParamRule(f"{a}{ours}.weight", (f"{h}{hf}.weight",))]
    table += linear_rules(a + "linear_proj", h + "to_out.0", ROW)
    table += linear_rules(a + "linear_added_proj", h + "to_add_out", ROW)
    for stream in ("img", "txt"):
        table += linear_rules(f"{_LAYER}{stream}_mlp.linear_fc1", f"{_BLOCK}{stream}_mlp.net.0.proj", COLUMN)
        table += linear_rules(f"{_LAYER}{stream}_mlp.linear_fc2", f"{_BLOCK}{stream}_mlp.net.2", ROW)

    # AdaLayerNormContinuous chunks are (scale, shift); final_modulation keeps that order.
    table += linear_rules("final_modulation.linear", "norm_out.linear", COLUMN)
    table += linear_rules("proj_out", "proj_out")
    return table


def transform_context(config) -> Dict:
    """What the table's transforms need to know about the model (the QKV head size)."""
    return {"head_dim": config.attention_head_dim}


def shift_dim(config) -> int:
    return config.joint_attention_dim if config.shift_site == "input" else config.hidden_size


# ============================================================================ config.json
DIFFUSERS_CLASS = "QwenImageTransformer2DModel"
# QwenImageConfig fields that config.json determines; every other field is an APEX/run option.
DIFFUSERS_ARCH_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                         "num_attention_heads", "joint_attention_dim", "axes_dims_rope")
_DIFFUSERS_UNSUPPORTED = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
# Architecture that diffusers hard-codes: a model that differs has no diffusers equivalent.
_DIFFUSERS_FIXED = {"rope_theta": 10000.0, "mlp_ratio": 4, "norm_eps": 1e-6, "timestep_channels": 256}


def config_from_diffusers(diffusers_config: Mapping, **overrides) -> QwenImageConfig:
    """``QwenImageConfig`` from a diffusers ``config.json`` dict; ``overrides`` set APEX/other fields."""
    for key in _DIFFUSERS_UNSUPPORTED:
        if diffusers_config.get(key):
            raise ValueError(f"diffusers config sets {key}=True, which QwenImageModel does not implement")
    fields = {k: diffusers_config[k] for k in DIFFUSERS_ARCH_FIELDS if k in diffusers_config}
    if fields.get("out_channels") is None and "in_channels" in fields:
        fields["out_channels"] = fields["in_channels"]
    if "axes_dims_rope" in fields:
        fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
    fields.update(overrides)
    return QwenImageConfig(**fields).validate()


def config_to_diffusers(config) -> Dict:
    """diffusers' ``config.json`` for a ``QwenImageConfig`` (architecture fields only; the
    APEX fields have no diffusers counterpart)."""
    for key, value in _DIFFUSERS_FIXED.items():
        if getattr(config, key) != value:
            raise ValueError(f"the model has {key}={getattr(config, key)!r}; diffusers' {DIFFUSERS_CLASS} "
                             f"hard-codes {value!r}, so it has no diffusers equivalent")
    out = {"_class_name": DIFFUSERS_CLASS}
    for key in DIFFUSERS_ARCH_FIELDS:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    out.update({key: False for key in _DIFFUSERS_UNSUPPORTED})
    return out


# ============================================================================ diffusers reference
def load_reference(path: str) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()


def reference_forward(hf_model, config, x, t, ctx, mask) -> torch.Tensor:
    """diffusers' velocity for our model's inputs: packed latents in, unpacked out."""
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    b, _, h, w = x.shape
    p = config.patch_size
    out = hf_model(hidden_states=pack_latents(x, p), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
                   timestep=t, img_shapes=[(1, h // p, w // p)] * b, return_dict=False)[0]
    return unpack_latents(out, h, w, p)


def default_latent_grid(config, vae_scale_factor: int) -> Tuple[int, int]:
    side = max(1, 1024 // vae_scale_factor)  # QwenImagePipeline: 1024 x 1024 px
    return side, side


QWEN_IMAGE = ModelFamily(
    name="qwen-image", config_class=QwenImageConfig, presets=PRESETS, default_model_name="qwen-image-20b",
    model_class=_model_class, layer_spec_builder=_layer_spec,
    diffusers_class=DIFFUSERS_CLASS, arch_fields=DIFFUSERS_ARCH_FIELDS,
    config_from_diffusers=config_from_diffusers, config_to_diffusers=config_to_diffusers,
    mapping_table=qwen_image_mapping_table, transform_context=transform_context,
    target_embedder_hf=TARGET_EMBEDDER_HF, shift_dim=shift_dim,
    load_reference=load_reference, reference_forward=reference_forward, default_latent_grid=default_latent_grid,
    pipeline_fields=("in_channels", "out_channels", "joint_attention_dim"),
)
