"""The ModuleSpec of one Qwen-Image dual-stream block per backend (models/specs.py says what
the backends mean)."""

from __future__ import annotations

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apex.gpu import TE_ATTENTION_BACKENDS
from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
from megatron_apex.models.common.mlp import DenseMLP
from megatron_apex.models.common.norms import LayerNormNoAffine, RMSNorm
from megatron_apex.models.qwen_image.layers import (
    JointAttention,
    JointAttentionSubmodules,
    QwenImageLayer,
    QwenImageLayerSubmodules,
    SDPAttention,
)
from megatron_apex.models.specs import local_core_attention, resolve_backend, te_modules


def get_qwen_image_layer_spec(backend: str = "auto", attention_backend: str = "auto") -> ModuleSpec:
    """Spec of one Qwen-Image dual-stream block for the given backends."""
    backend = resolve_backend(backend)
    if backend == "te":
        column, row, core_attention, qk_norm = te_modules()
        if attention_backend not in TE_ATTENTION_BACKENDS:
            core_attention = local_core_attention(SDPAttention, attention_backend)
    else:
        column, row, qk_norm = FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear, RMSNorm
        core_attention = local_core_attention(SDPAttention, attention_backend)
    return ModuleSpec(
        module=QwenImageLayer,
        submodules=QwenImageLayerSubmodules(
            # Local on every backend: it must gather its output (TE's column linear cannot).
            modulation_linear=FusedBiasColumnParallelLinear,
            # Parameter-free LayerNorm; nothing for TE to fuse.
            adaln_norm=LayerNormNoAffine,
            attention=ModuleSpec(
                module=JointAttention,
                submodules=JointAttentionSubmodules(
                    linear_qkv=column, linear_proj=row, core_attention=core_attention, qk_norm=qk_norm,
                ),
            ),
            # TE's linears add the bias in their GEMM: megatron's MLP; the local path: DenseMLP
            mlp=ModuleSpec(module=MLP if backend == "te" else DenseMLP,
                           submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
        metainfo={"backend": backend, "attention_backend": attention_backend},
    )
