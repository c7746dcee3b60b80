"""What every family's layer spec decides the same way: which implementation backend the
swappable pieces of a block use. Each family's spec itself lives beside its layers
(models/qwen_image/layer_spec.py, models/sana/layer_spec.py), as megatron-core keeps
gpt_layer_specs.py beside the GPT model.

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
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_apex.gpu import kernel_for, transformer_engine_unavailable

BACKENDS = ("auto", "local", "te", "transformer_engine")


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and transformer_engine_unavailable() is None


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"--transformer-impl/backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    return "te" if backend == "transformer_engine" else backend


def local_core_attention(module, attention_backend: str):
    """``module`` (our SDPA-based core attention) running the kernel of ``attention_backend``."""
    kernel = kernel_for(attention_backend)
    return module if kernel == "auto" else ModuleSpec(module=module, params={"attention_backend": kernel})


def te_modules():
    """Transformer Engine's (column linear, row linear, core attention, norm) megatron wrappers."""
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
