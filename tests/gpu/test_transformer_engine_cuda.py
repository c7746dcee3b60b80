"""Transformer Engine layers (the te spec) compute what the local layers compute, at float32
and bf16, on the same weights; FP8 (hybrid, delayed scaling) forward and backward run on an
FP8-capable GPU and stay near bf16."""

from __future__ import annotations

import pytest
import torch
from _gpu_helpers import FAMILIES, forward_backward, inputs, model_for, options, rel

from megatron_apex import gpu


@pytest.fixture(autouse=True)
def transformer_engine(device):
    if device.type != "cuda":
        pytest.skip("Transformer Engine runs only on CUDA")
    reason = gpu.transformer_engine_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", FAMILIES)
# float32: TE's GEMMs may run in TF32 (10-bit mantissa); a wrong weight layout is O(1) off.
@pytest.mark.parametrize("bf16,tol", [(False, 1e-2), (True, 0.03)])
def test_te_layers_match_local_layers(name, bf16, tol, device):
    config, local = model_for(name, options(transformer_impl="local", bf16=bf16), seed=6, device=device)
    _, te = model_for(name, options(transformer_impl="transformer_engine", attention_backend="auto", bf16=bf16),
                      state=local.state_dict(), device=device)
    assert any(type(m).__name__.startswith("TE") for m in te.modules())
    x, t, ctx, mask = inputs(config, device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for m in (None, mask):
        out, grads = forward_backward(te, x, t, ctx, m, weight)
        ref, ref_grads = forward_backward(local, x, t, ctx, m, weight)
        assert rel(out, ref) < tol, m is None
        flat = torch.cat([grads[k].float().flatten() for k in sorted(grads)])
        ref_flat = torch.cat([ref_grads[k].float().flatten() for k in sorted(ref_grads)])
        assert rel(flat, ref_flat) < 2 * tol, m is None


@pytest.mark.parametrize("name", FAMILIES)
def test_fp8_forward_backward_runs(name, device):
    if tuple(torch.cuda.get_device_capability()) < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU is {torch.cuda.get_device_capability()}")
    fp8 = options(transformer_impl="transformer_engine", attention_backend="auto", fp8_format="hybrid", bf16=True)
    config, bf16 = model_for(name, options(transformer_impl="transformer_engine", bf16=True), seed=7, device=device)
    _, model = model_for(name, fp8, state=bf16.state_dict(), device=device)
    x, t, ctx, mask = inputs(config, device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref, _ = forward_backward(bf16, x, t, ctx, mask, weight)
    for _ in range(3):  # delayed scaling: the amax history fills over the first iterations
        out, grads = forward_backward(model, x, t, ctx, mask, weight, context=gpu.fp8_context(fp8, model))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert rel(out, ref) < 0.15  # e4m3 keeps 3 mantissa bits
