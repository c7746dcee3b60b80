"""ModuleSpecs: which implementation each swappable piece of a block uses.

``local``: megatron-core's tensor-parallel linears (with the bias inside the matmul,
models/common/linear.py), our SDPA core attention and norms
(runs anywhere, CPU included). ``te``: Transformer Engine-backed megatron modules for the
linears, core attention and q/k norms (imported only when asked for; ``transformer_engine``
is accepted for ``te``, Megatron-LM's --transformer-impl name). ``auto``: ``te`` when
Transformer Engine imports and CUDA is available, else ``local``.

``attention_backend`` (--attention-backend, megatron_apex/gpu.py) picks the core attention:
on ``te``, ``auto``/``flash``/``fused``/``unfused`` keep TE's DotProductAttention (its kernel
chosen by NVTE_* variables) and ``local``/``math``/``flash_attn`` put our SDPAttention next to
TE's linears; on ``local`` it is always our SDPAttention, running the kernel of
``gpu.kernel_for``. The default (``auto`` kernel) builds the bare class, no spec params.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apex.gpu import TE_ATTENTION_BACKENDS, kernel_for, transformer_engine_unavailable
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

BACKENDS = ("auto", "local", "te", "transformer_engine")


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and transformer_engine_unavailable() is None


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"--transformer-impl/backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    return "te" if backend == "transformer_engine" else backend


def _local_core_attention(module, attention_backend: str):
    """``module`` (our SDPA-based core attention) running the kernel of ``attention_backend``."""
    kernel = kernel_for(attention_backend)
    return module if kernel == "auto" else ModuleSpec(module=module, params={"attention_backend": kernel})


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


def get_qwen_image_layer_spec(backend: str = "auto", attention_backend: str = "auto") -> ModuleSpec:
    """Spec of one Qwen-Image dual-stream block for the given backends."""
    backend = resolve_backend(backend)
    if backend == "te":
        column, row, core_attention, qk_norm = _te_modules()
        if attention_backend not in TE_ATTENTION_BACKENDS:
            core_attention = _local_core_attention(SDPAttention, attention_backend)
    else:
        column, row, qk_norm = FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear, RMSNorm
        core_attention = _local_core_attention(SDPAttention, attention_backend)
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


def get_sana_layer_spec(backend: str = "auto", attention_backend: str = "auto") -> ModuleSpec:
    """Spec of one Sana block for the given backend. ``te`` swaps the tensor-parallel linears
    for Transformer Engine's; the attention cores stay local on every backend (the ReLU
    linear attention is Sana's own, and the cross-attention keeps diffusers' additive -10000
    caption bias, which TE's padding mask does not reproduce for an all-padded caption); the
    cross-attention core runs the kernel of ``attention_backend`` (TE's names map to the SDPA
    kernels of the same name)."""
    backend = resolve_backend(backend)
    cross_core = _local_core_attention(MaskedSDPAttention, attention_backend)
    if backend == "te":
        column, row, _, _ = _te_modules()
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
