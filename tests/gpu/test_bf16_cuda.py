"""bf16 on the GPU against the float32 CPU model: outputs and gradients of tiny Qwen-Image and
Sana models (same weights), relative errors within bf16's reach. The --bf16 path is the one
training runs: model_overrides -> bfloat16 parameters, SDPA letting torch choose."""

from __future__ import annotations

import pytest
import torch
from _gpu_helpers import FAMILIES, forward_backward, inputs, model_for, options, rel

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.002 per operation); through a few
# layers the output is typically within 1% of float32 (docs/gpu.md measured 0.7% for a
# 3-layer Qwen-Image). Gradients pass through twice as many roundings.
OUTPUT_TOL = 0.03
GRAD_TOL = 0.06


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_forward_backward_matches_float32_reference(name, device):
    fp32 = options(transformer_impl="local", attention_backend="auto")
    config, reference = model_for(name, fp32, seed=3)
    _, model = model_for(name, options(transformer_impl="local", attention_backend="auto", bf16=True),
                         state=reference.state_dict(), device=device)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x, t, ctx, mask = inputs(config, "cpu")
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    ref_out, ref_grads = forward_backward(reference, x, t, ctx, mask, weight)
    out, grads = forward_backward(model, x.to(device), t.to(device), ctx.to(device), mask.to(device), weight)
    assert out.device.type == device.type and out.dtype == x.dtype  # the model returns x_t's dtype
    assert ref_out.abs().max() > 0.1  # random weights: a non-degenerate output
    assert rel(out, ref_out) < OUTPUT_TOL
    assert grads.keys() == ref_grads.keys()
    flat = torch.cat([grads[k].float().cpu().flatten() for k in sorted(grads)])
    ref_flat = torch.cat([ref_grads[k].flatten() for k in sorted(ref_grads)])
    assert rel(flat, ref_flat) < GRAD_TOL
    # the largest weight matrices, one by one
    big = sorted(ref_grads, key=lambda k: ref_grads[k].numel())[-4:]
    for key in big:
        assert rel(grads[key], ref_grads[key]) < 2 * GRAD_TOL, key
