"""Model registry: name -> config factory, plus build and parameter-count helpers that
dispatch on the config's type (one entry per model family in ``FAMILIES``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Union

import torch

from megatron_apex.models.qwen_image.config import QwenImageConfig
from megatron_apex.models.sana.config import SanaConfig

ModelConfig = Union[QwenImageConfig, SanaConfig]


# ----------------------------------------------------------------------------- Qwen-Image
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


# ----------------------------------------------------------------------------- Sana
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


MODEL_REGISTRY: Dict[str, Callable[[], ModelConfig]] = {
    "qwen-image-20b": _qwen_image_20b,
    "qwen-image-tiny": _qwen_image_tiny,
    "qwen-image-tiny-p2": _qwen_image_tiny_p2,
    "qwen-image-tiny-fast": _qwen_image_tiny_fast,
    "qwen-image-tiny-test": _qwen_image_tiny_test,
    "sana-0.6b": _sana_600m,
    "sana-1.6b": _sana_1600m,
    "sana-tiny": _sana_tiny,
    "sana-tiny-test": _sana_tiny_test,
}


# ----------------------------------------------------------------------------- families
@dataclass(frozen=True)
class _Family:
    """How to build a model of one config type: its class and its layer spec (imported
    only when called, so this module stays free of megatron-core)."""

    model_class: Callable[[], type]
    layer_spec: Callable[[str], Any]


def _qwen_image_family() -> _Family:
    def model_class():
        from megatron_apex.models.qwen_image.model import QwenImageModel

        return QwenImageModel

    def spec(backend):
        from megatron_apex.models.specs import get_qwen_image_layer_spec

        return get_qwen_image_layer_spec(backend)

    return _Family(model_class, spec)


def _sana_family() -> _Family:
    def model_class():
        from megatron_apex.models.sana.model import SanaModel

        return SanaModel

    def spec(backend):
        from megatron_apex.models.specs import get_sana_layer_spec

        return get_sana_layer_spec(backend)

    return _Family(model_class, spec)


FAMILIES: Dict[type, Callable[[], _Family]] = {QwenImageConfig: _qwen_image_family, SanaConfig: _sana_family}


def _family_of(config) -> _Family:
    factory = FAMILIES.get(type(config))
    if factory is None:
        known = ", ".join(cls.__name__ for cls in FAMILIES)
        raise ValueError(f"no model family for a config of type {type(config).__name__}; known: {known}")
    return factory()


def get_model_config(name: str, **overrides) -> ModelConfig:
    """The registered config ``name`` with dataclass fields replaced by ``overrides``."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown --model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}")
    config = MODEL_REGISTRY[name]()
    if overrides:
        config = config.replace(**overrides)
    return config.validate()


def build_model(config: Union[ModelConfig, str], pre_process: bool = True, post_process: bool = True,
                spec=None, backend: str = "auto", sequence_parallel: bool = False):
    """Build the model for this rank's tensor/pipeline position (megatron's parallel_state);
    ``sequence_parallel``: Megatron-LM's --sequence-parallel (TP > 1, Qwen-Image)."""
    if isinstance(config, str):
        config = get_model_config(config)
    family = _family_of(config)
    if spec is None:
        spec = family.layer_spec(backend)
    extra = {"sequence_parallel": True} if sequence_parallel else {}
    return family.model_class()(config, spec=spec, pre_process=pre_process, post_process=post_process, **extra)


def count_parameters(config: Union[ModelConfig, str], backend: str = "local") -> int:
    """Parameters of the WHOLE model (all stages, unsharded), built on the meta device.

    Tensor-parallel shards are counted times the TP size, so the answer does not depend on
    how megatron is set up in this process (or whether it is at all).
    """
    from megatron.core import parallel_state

    if isinstance(config, str):
        config = get_model_config(config)
    family = _family_of(config)
    initialized = parallel_state.model_parallel_is_initialized()
    tp = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
    # Initialisation stays on: on meta it costs nothing, and it is what marks megatron's
    # weights as tensor-parallel.
    with torch.device("meta"):
        model = family.model_class()(config, spec=family.layer_spec(backend), layer_range=(0, config.num_layers))
    total = 0
    for param in model.parameters():
        shards = tp if getattr(param, "tensor_model_parallel", False) else 1
        total += param.numel() * shards
    return total
