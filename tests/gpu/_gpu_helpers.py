"""Shared by tests/gpu: tiny models with random unit-scale weights, inputs, error measures."""

from __future__ import annotations

import torch

from megatron_apex import gpu
from megatron_apex.conversion.random_weights import randomize_weights_
from megatron_apex.families import build_model, get_model_config, layer_spec

# qwen-image-tiny: D = 4 x 24, 4 layers, 4x4 patches, text width 384; sana-tiny: D = 4 x 32.
# Latent 16 x 24 (4 x 6 = 24 tokens), 8 text tokens: every TE GEMM dimension FP8 can take.
FAMILIES = ("qwen-image-tiny", "sana-tiny")


def model_for(name: str, options: gpu.GpuOptions, state=None, seed: int = 0, device="cpu"):
    """``name`` built for ``options`` (resolved), with ``state`` or random weights, on ``device``."""
    config = get_model_config(name, **gpu.model_overrides(options))
    model = build_model(config, spec=layer_spec(config, options))
    if state is None:
        randomize_weights_(model, seed)
    else:
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return config, model.to(device)


def options(**fields) -> gpu.GpuOptions:
    return gpu.resolve_gpu_options(gpu.GpuOptions(**fields))


def inputs(config, device, batch: int = 2, height: int = 16, width: int = 24, text: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.latent_channels, height, width, generator=gen)
    t = torch.rand(batch, generator=gen)
    width_ctx = getattr(config, "joint_attention_dim", None) or config.caption_channels
    ctx = torch.randn(batch, text, width_ctx, generator=gen)
    mask = torch.ones(batch, text)
    mask[1, text // 2:] = 0  # padded text
    return x.to(device), t.to(device), ctx.to(device), mask.to(device)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def forward_backward(model, x, t, ctx, mask, weight, context=None):
    """Output and {name: grad} of sum(output * weight)."""
    import contextlib

    model.zero_grad(set_to_none=True)
    with context or contextlib.nullcontext():
        out = model(x, t, ctx, mask)
    (out.float() * weight.to(out.device)).sum().backward()
    return out.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
