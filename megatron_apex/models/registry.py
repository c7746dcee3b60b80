"""Model registry: name -> config factory, plus build and parameter-count helpers."""

from __future__ import annotations

from typing import Callable, Dict

import torch

from megatron_apex.models.qwen_image.config import QwenImageConfig


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


MODEL_REGISTRY: Dict[str, Callable[[], QwenImageConfig]] = {
    "qwen-image-20b": _qwen_image_20b,
    "qwen-image-tiny": _qwen_image_tiny,
    "qwen-image-tiny-p2": _qwen_image_tiny_p2,
    "qwen-image-tiny-fast": _qwen_image_tiny_fast,
    "qwen-image-tiny-test": _qwen_image_tiny_test,
}


def get_model_config(name: str, **overrides) -> QwenImageConfig:
    """The registered config ``name`` with dataclass fields replaced by ``overrides``."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown --model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}")
    config = MODEL_REGISTRY[name]()
    if overrides:
        config = config.replace(**overrides)
    return config.validate()


def build_model(config: QwenImageConfig, pre_process: bool = True, post_process: bool = True,
                spec=None, backend: str = "auto"):
    """Build the model for this rank's tensor/pipeline position (megatron's parallel_state)."""
    from megatron_apex.models.qwen_image.model import QwenImageModel
    from megatron_apex.models.specs import get_qwen_image_layer_spec

    if isinstance(config, str):
        config = get_model_config(config)
    if spec is None:
        spec = get_qwen_image_layer_spec(backend)
    return QwenImageModel(config, spec=spec, pre_process=pre_process, post_process=post_process)


def count_parameters(config: QwenImageConfig, backend: str = "local") -> int:
    """Parameters of the WHOLE model (all stages, unsharded), built on the meta device.

    Tensor-parallel shards are counted times the TP size, so the answer does not depend on
    how megatron is set up in this process (or whether it is at all).
    """
    from megatron.core import parallel_state

    from megatron_apex.models.qwen_image.model import QwenImageModel
    from megatron_apex.models.specs import get_qwen_image_layer_spec

    if isinstance(config, str):
        config = get_model_config(config)
    initialized = parallel_state.model_parallel_is_initialized()
    tp = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
    # Initialisation stays on: on meta it costs nothing, and it is what marks megatron's
    # weights as tensor-parallel.
    with torch.device("meta"):
        model = QwenImageModel(config, spec=get_qwen_image_layer_spec(backend),
                               layer_range=(0, config.num_layers))
    total = 0
    for param in model.parameters():
        shards = tp if getattr(param, "tensor_model_parallel", False) else 1
        total += param.numel() * shards
    return total
