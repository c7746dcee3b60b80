"""Multi-axis rotary position embedding (Qwen-Image's ``QwenEmbedRope``).

Each token's rotation is a complex unit number per pair of consecutive head channels, built
once per shape and device; applying it is one complex multiply, as diffusers does. (megatron-core's
``apply_rotary_pos_emb`` with ``rotary_interleaved=True`` computes the same rotation but
recomputes cos/sin and re-interleaves the channels in every call: ~10 ops instead of ~3, which
made the tiny model's forward several percent slower than diffusers'.)
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def axis_inverse_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(dim/2,) float32 ``1 / theta^(2j/dim)`` (same expression as diffusers, bit for bit)."""
    if dim % 2:
        raise ValueError(f"every RoPE axis dim must be even, got {dim}")
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    return torch.outer(positions.to(torch.float32), axis_inverse_frequencies(dim, theta))


def centred_positions(n: int) -> torch.Tensor:
    """``-ceil(n/2) .. floor(n/2)-1``: diffusers' ``scale_rope=True`` centring of an image axis."""
    return torch.arange(n) - (n - n // 2)


def qwen_image_rope_angles(
    grid_h: int,
    grid_w: int,
    text_len: int,
    axes_dims: Sequence[int],
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rotations ``(text (L, head_dim/2), image (h*w, head_dim/2))``, complex64
    ``exp(i * angle)``.

    Image token (i, j) in raster order has positions (frame 0, centred row, centred column);
    text token k has position ``max(h//2, w//2) + k`` on all three axes, so text sits just past
    the largest image coordinate.

    Built once per shape and device and then shared (as diffusers caches its RoPE table): the
    ~80 small ops that build them cost a few percent of a small model's forward. Callers must
    not modify them in place.
    """
    if len(axes_dims) != 3:
        raise ValueError(f"axes_dims_rope must have 3 entries (frame, height, width), got {list(axes_dims)}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _cached_rotations(int(grid_h), int(grid_w), int(text_len), tuple(int(d) for d in axes_dims),
                             float(theta), device)


@functools.lru_cache(maxsize=32)
def _cached_rotations(grid_h: int, grid_w: int, text_len: int, axes_dims: tuple, theta: float,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Ordinary tensors even when first asked for under torch.inference_mode(): an inference
    # tensor could not be saved for a later training forward's backward.
    with torch.inference_mode(False), torch.no_grad():
        return _rotations(grid_h, grid_w, text_len, axes_dims, theta, device)


def _rotations(grid_h: int, grid_w: int, text_len: int, axes_dims: tuple, theta: float,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    d_frame, d_h, d_w = axes_dims
    rows = centred_positions(grid_h)
    cols = centred_positions(grid_w)
    frame = _axis_angles(torch.zeros(1), d_frame, theta).expand(grid_h * grid_w, -1)
    height = _axis_angles(rows, d_h, theta)[:, None, :].expand(grid_h, grid_w, -1).reshape(grid_h * grid_w, -1)
    width = _axis_angles(cols, d_w, theta)[None, :, :].expand(grid_h, grid_w, -1).reshape(grid_h * grid_w, -1)
    image = torch.cat([frame, height, width], dim=-1)

    text_pos = torch.arange(text_len) + max(grid_h // 2, grid_w // 2)
    text = torch.cat([_axis_angles(text_pos, d, theta) for d in axes_dims], dim=-1)
    text, image = text.to(device), image.to(device)
    return torch.polar(torch.ones_like(text), text), torch.polar(torch.ones_like(image), image)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` [s, b, heads, head_dim] by ``rotation``
    [s, head_dim/2] (complex); computed in float32, returned in x's dtype."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation[:, None, None, :]).flatten(3).type_as(x)
