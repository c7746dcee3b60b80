"""The ModuleSpec of one Sana block per backend (models/specs.py says what the backends mean)."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
from megatron_apex.models.common.norms import LayerNormNoAffine
from megatron_apex.models.sana.layers import (
    DepthwiseConv3x3,
    GLUMBConv,
    GLUMBConvSubmodules,
    MaskedSDPAttention,
    ReLULinearAttention,
    SanaCrossAttention,
    SanaCrossAttentionSubmodules,
    SanaLayer,
    SanaLayerSubmodules,
    SanaSelfAttention,
    SanaSelfAttentionSubmodules,
)
from megatron_apex.models.specs import local_core_attention, resolve_backend, te_modules


def get_sana_layer_spec(backend: str = "auto", attention_backend: str = "auto") -> ModuleSpec:
    """Spec of one Sana block for the given backend. ``te`` swaps the tensor-parallel linears
    for Transformer Engine's; the attention cores stay local on every backend (the ReLU
    linear attention is Sana's own, and the cross-attention keeps diffusers' additive -10000
    caption bias, which TE's padding mask does not reproduce for an all-padded caption); the
    cross-attention core runs the kernel of ``attention_backend`` (TE's names map to the SDPA
    kernels of the same name)."""
    backend = resolve_backend(backend)
    cross_core = local_core_attention(MaskedSDPAttention, attention_backend)
    if backend == "te":
        column, row, _, _ = te_modules()
    else:
        column, row = FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
    return ModuleSpec(
        module=SanaLayer,
        submodules=SanaLayerSubmodules(
            # The model's adaLN-single linear (the blocks have none): local on every backend,
            # it must gather its output (TE's column linear cannot).
            time_modulation_linear=FusedBiasColumnParallelLinear,
            adaln_norm=LayerNormNoAffine,
            attention=ModuleSpec(
                module=SanaSelfAttention,
                submodules=SanaSelfAttentionSubmodules(
                    linear_qkv=column, linear_proj=row, core_attention=ReLULinearAttention,
                ),
            ),
            cross_attention=ModuleSpec(
                module=SanaCrossAttention,
                submodules=SanaCrossAttentionSubmodules(
                    linear_q=column, linear_kv=column, linear_proj=row, core_attention=cross_core,
                ),
            ),
            mlp=ModuleSpec(
                module=GLUMBConv,
                submodules=GLUMBConvSubmodules(linear_fc1=column, depthwise=DepthwiseConv3x3, linear_fc2=row),
            ),
        ),
        metainfo={"backend": backend, "attention_backend": attention_backend},
    )
