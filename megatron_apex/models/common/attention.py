"""The attention kernels our own core-attention modules run (Qwen-Image's ``SDPAttention``,
Sana's ``MaskedSDPAttention``): SDPA restricted to a kernel, or the flash-attn package.

``kernel`` is what megatron_apex.gpu's ``kernel_for`` makes of --attention-backend:
  auto     the flash-attn package for bf16/fp16 CUDA calls when it is installed,
           else SDPA letting torch choose;
  sdpa     SDPA letting torch choose, never flash-attn (--attention-backend local);
  flash    SDPA restricted to the flash kernel; calls WITH a mask also allow the
           memory-efficient kernel (torch's CUDA flash kernel takes no mask);
  fused    SDPA restricted to the cuDNN and memory-efficient kernels (CUDA only);
  unfused  SDPA's math kernel (--attention-backend math or unfused);
  flash_attn  flash_attn_func; with a mask flash_attn_varlen_func over each sample's
           valid keys (exact for key-padding masks, see ``attention``).
flash-attn is optional: megatron_apex.gpu imports it on first use.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_apex.gpu import flash_attn_module

KERNELS = ("auto", "sdpa", "flash", "fused", "unfused", "flash_attn")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention_backend must be one of {KERNELS}, got {kernel!r}")
    return kernel


def flash_attn_unsupported(query) -> Optional[str]:
    """None when flash-attn can take ``query`` (SDPA layout [b, h, s, d]), else why not."""
    if query.device.type != "cuda":
        return f"it needs CUDA tensors, got {query.device.type}"
    if query.dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 tensors, got {query.dtype} (use --bf16)"
    head_dim = query.shape[-1]
    if head_dim > 256 or head_dim % 8:
        return f"it needs a head dim <= 256 and a multiple of 8, got {head_dim}"
    return None


def _sdpa_backends(kernel: str, masked: bool):
    if kernel == "flash":
        return [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if masked else [])
    if kernel == "fused":
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if kernel == "unfused":
        return [SDPBackend.MATH]
    return None


def attention(query, key, value, attn_mask=None, scale: Optional[float] = None, dropout_p: float = 0.0,
              kernel: str = "auto"):
    """``F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, scale=scale)``
    ([b, h, s, d] in and out) on the kernel ``kernel`` (see the module docstring).

    flash-attn takes no mask: a key-padding mask (bool [b, 1, 1, s_kv], True = attend, or an
    additive [b, 1, 1, s_kv] bias of 0 / large negative) runs as flash_attn_varlen_func over
    each sample's valid keys, every query kept. That equals the masked softmax exactly; a
    sample with no valid key attends to all its keys, which is what a constant additive bias
    gives (softmax is shift-invariant; SDPA's boolean mask would give NaN there)."""
    if kernel == "flash_attn" or (kernel == "auto" and flash_attn_module() is not None
                                  and flash_attn_unsupported(query) is None):
        module = flash_attn_module()
        if module is None:
            raise ValueError("--attention-backend flash_attn: flash_attn does not import (pip install flash-attn)")
        reason = flash_attn_unsupported(query)
        if reason is not None:
            raise ValueError(f"--attention-backend flash_attn cannot run this call: {reason}")
        return _flash_attn(module, query, key, value, attn_mask, scale, dropout_p)
    backends = _sdpa_backends(check_kernel(kernel), attn_mask is not None)
    if backends is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              scale=scale)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              scale=scale)


def key_padding(attn_mask, batch: int, kv_len: int):
    """(b, s_kv) bool, True = valid key, from a key-padding mask (see ``attention``)."""
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[3] != kv_len:
        raise ValueError(f"--attention-backend flash_attn takes key-padding masks [b, 1, 1, {kv_len}] only, got "
                         f"{list(attn_mask.shape)}")
    mask = attn_mask[:, 0, 0, :].expand(batch, kv_len)
    return mask if mask.dtype == torch.bool else mask == 0


def _flash_attn(module, query, key, value, attn_mask, scale, dropout_p):
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # flash-attn's [b, s, h, d]
    b, sq, heads, d = q.shape
    skv = k.shape[1]
    if attn_mask is None:
        out = module.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=False)
        return out.transpose(1, 2)
    valid = key_padding(attn_mask, b, skv)
    valid = valid | ~valid.any(dim=1, keepdim=True)
    cu_k = F.pad(valid.sum(dim=1).cumsum(0).to(torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    # max_seqlen_k is an upper bound (s_kv) so no host sync is needed for it.
    out = module.flash_attn_varlen_func(q.reshape(b * sq, heads, d), k[valid], v[valid], cu_q, cu_k, sq, skv,
                                        dropout_p=dropout_p, softmax_scale=scale, causal=False)
    return out.reshape(b, sq, heads, d).transpose(1, 2)
