"""Random weights for diffusers models in parity tests and checks: every parameter nonzero and
of unit-ish scale (diffusers' own init zeroes some, which would hide mapping mistakes)."""

import torch


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """In place: norm weights ~ 1 + 0.2 N(0, 1), everything else N(0, 1) / sqrt(fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".norm_" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1] if p.dim() == 2 else 4.0
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return model
