"""ModuleSpecs: which implementation each swappable piece of a block uses.

``local``: megatron-core's own tensor-parallel linears, our SDPA core attention and norms
(runs anywhere, CPU included). ``te``: Transformer Engine-backed megatron modules for the
linears, core attention and q/k norms (imported only when asked for). ``auto``: ``te`` when
Transformer Engine imports and CUDA is available, else ``local``.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apex.models.common.norms import LayerNormNoAffine, RMSNorm
from megatron_apex.models.qwen_image.layers import (
    JointAttention,
    JointAttentionSubmodules,
    QwenImageLayer,
    QwenImageLayerSubmodules,
    SDPAttention,
)

BACKENDS = ("auto", "local", "te")


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"--transformer-impl/backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    return backend


def _te_modules():
    try:
        import transformer_engine  # noqa: F401  (megatron's wrappers import without it)
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )
    except ImportError as exc:
        raise ImportError(
            "backend 'te' needs transformer_engine (pip install transformer-engine[pytorch]); "
            f"use backend 'local' instead ({exc})"
        ) from exc
    return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, TENorm


def get_qwen_image_layer_spec(backend: str = "auto") -> ModuleSpec:
    """Spec of one Qwen-Image dual-stream block for the given backend."""
    backend = resolve_backend(backend)
    if backend == "te":
        column, row, core_attention, qk_norm = _te_modules()
    else:
        column, row, core_attention, qk_norm = ColumnParallelLinear, RowParallelLinear, SDPAttention, RMSNorm
    return ModuleSpec(
        module=QwenImageLayer,
        submodules=QwenImageLayerSubmodules(
            # Local on every backend: it must gather its output (TE's column linear cannot).
            modulation_linear=ColumnParallelLinear,
            # Parameter-free LayerNorm; nothing for TE to fuse.
            adaln_norm=LayerNormNoAffine,
            attention=ModuleSpec(
                module=JointAttention,
                submodules=JointAttentionSubmodules(
                    linear_qkv=column, linear_proj=row, core_attention=core_attention, qk_norm=qk_norm,
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
        metainfo={"backend": backend},
    )
