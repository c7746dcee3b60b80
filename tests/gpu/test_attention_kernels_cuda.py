"""The attention kernels run what they claim on CUDA: SDPA's flash kernel (alone, so torch
fails loudly if it cannot take the call), the fused kernels, the flash-attn package with the
padded text through varlen; each against SDPA's math kernel on the same bf16 weights."""

from __future__ import annotations

import pytest
import torch
from _gpu_helpers import FAMILIES, forward_backward, inputs, model_for, options, rel
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_apex import gpu

BF16_KERNEL_TOL = 0.02  # two bf16 kernels of the same math: different summation orders


def pair(name, backend, device):
    """(config, model on the math kernel, model on ``backend``), same bf16 weights."""
    config, math = model_for(name, options(transformer_impl="local", attention_backend="unfused", bf16=True), seed=4)
    _, other = model_for(name, options(transformer_impl="local", attention_backend=backend, bf16=True),
                         state=math.state_dict())
    return config, math.to(device), other.to(device)


@pytest.mark.parametrize("name", FAMILIES)
def test_sdpa_flash_kernel_is_selected_and_agrees(name, device):
    config, math, flash = pair(name, "flash", device)
    x, t, ctx, mask = inputs(config, device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    if name.startswith("qwen"):
        # unmasked joint attention under the flash kernel ALONE: torch raises if flash cannot run
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out, grads = forward_backward(flash, x, t, ctx, None, weight)
        ref, ref_grads = forward_backward(math, x, t, ctx, None, weight)
        assert rel(out, ref) < BF16_KERNEL_TOL
        assert rel(grads["layers.0.attention.linear_qkv.weight"], ref_grads["layers.0.attention.linear_qkv.weight"]) \
            < 2 * BF16_KERNEL_TOL
    # with the padded text: flash's rule falls back to the memory-efficient kernel (or runs on CPU's flash)
    out, _ = forward_backward(flash, x, t, ctx, mask, weight)
    ref, _ = forward_backward(math, x, t, ctx, mask, weight)
    assert rel(out, ref) < BF16_KERNEL_TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_sdpa_fused_kernels_agree(name, device):
    if device.type != "cuda":
        pytest.skip("SDPA's fused kernels (cuDNN, memory-efficient) exist only on CUDA")
    config, math, fused = pair(name, "fused", device)
    x, t, ctx, mask = inputs(config, device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for m in (None, mask):
        out, grads = forward_backward(fused, x, t, ctx, m, weight)
        ref, ref_grads = forward_backward(math, x, t, ctx, m, weight)
        assert rel(out, ref) < BF16_KERNEL_TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_flash_attn_package_agrees_with_and_without_padding(name, device):
    if gpu.flash_attn_module() is None:
        pytest.skip("flash-attn is not installed")
    if device.type != "cuda":
        pytest.skip("flash-attn runs only on CUDA")
    config, math, flash = pair(name, "flash_attn", device)
    x, t, ctx, mask = inputs(config, device)
    mask[0] = 0  # all text padded: Qwen-Image keeps the image keys; a Sana caption attends to every token
    # Sana's reference for that sample: no padding. The -10000 bias means the same (softmax is
    # shift-invariant) but in bf16 logit - 10000 rounds to multiples of 64, which the exact
    # varlen path does not reproduce.
    ref_mask = mask.clone()
    if name.startswith("sana"):
        ref_mask[0] = 1
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for m, m_ref in ((None, None), (mask, ref_mask)):
        out, grads = forward_backward(flash, x, t, ctx, m, weight)
        ref, ref_grads = forward_backward(math, x, t, ctx, m_ref, weight)
        assert rel(out, ref) < BF16_KERNEL_TOL
        flat = torch.cat([grads[k].float().flatten() for k in sorted(grads)])
        ref_flat = torch.cat([ref_grads[k].float().flatten() for k in sorted(ref_grads)])
        assert rel(flat, ref_flat) < 2 * BF16_KERNEL_TOL
