"""What every model's forward does the same way before its own layers: validate the inputs of
the model contract (docs/apex_method.md) with errors naming the flag, and embed the any-step time pair."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def check_time(name: str, value, batch: int, device) -> torch.Tensor:
    value = torch.as_tensor(value, device=device)
    if value.dim() == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
    if not value.is_floating_point():
        value = value.float()
    return value


def check_model_inputs(x_t, t, context, context_mask, t_target, *, channels: int, channels_flag: str,
                       patch_size: int, context_dim: int, context_flag: str):
    """(t, t_target) as (B,) float tensors; a one-line ValueError naming the flag otherwise."""
    if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
        raise ValueError(f"x_t must be a (B, C, H, W) tensor, got shape {tuple(getattr(x_t, 'shape', ()))}")
    b, c, h, w = x_t.shape
    if c != channels:
        raise ValueError(f"x_t has {c} channels, the model expects {channels_flag} ({channels})")
    if h % patch_size or w % patch_size:
        raise ValueError(f"x_t height x width ({h} x {w}) must be multiples of --patch-size ({patch_size})")
    t = check_time("t", t, b, x_t.device)
    if t_target is not None:
        t_target = check_time("t_target", t_target, b, x_t.device)
    if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != b:
        raise ValueError(f"context must be (B={b}, L, {context_dim}), got {tuple(getattr(context, 'shape', ()))}")
    if context.shape[2] != context_dim:
        raise ValueError(f"context has width {context.shape[2]}, the model expects {context_flag} ({context_dim})")
    if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
        raise ValueError(
            f"context_mask must have shape {tuple(context.shape[:2])} (B, L), got {tuple(context_mask.shape)}")
    return t, t_target


def embed_any_step_time(time_embedder, target_time_embedder: Optional[torch.nn.Module], t: torch.Tensor,
                        t_target: Optional[torch.Tensor]) -> torch.Tensor:
    """emb(t) [+ emb_2(tt) * (t - tt)]; ``target_time_embedder`` None = the model has none."""
    temb = time_embedder(t)
    if target_time_embedder is None:
        if t_target is not None and not torch.equal(t_target.to(t.dtype), t):
            raise ValueError("t_target differs from t but the model has no target-time embedder "
                             "(--target-time-embedder is off)")
        return temb
    if t_target is None and not torch.is_grad_enabled():
        # tt = t: the second term is exactly zero and no backward needs its graph (no-grad
        # queries, sampling), so the second embedder is not run
        return temb
    tt = t if t_target is None else t_target
    # tt = t makes the second term exactly zero: plain velocity queries are unchanged.
    step = (t.float() - tt.float()).to(temb.dtype)[:, None]
    return temb + target_time_embedder(tt) * step
