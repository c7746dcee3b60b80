"""Samplers on the OT path x_t = t*z + (1-t)*x (t = 1 noise, t = 0 data).

`euler`   : the probability-flow ODE, velocity queries F(x_t, t, c) with tt = t.
`flowmap` : any-step jumps F(x_t, t, c, tt = next t): x_tt = x_t - (t - tt) * F. For a model
            without a target-time input it is identical to `euler`.
`renoise` : predict the endpoint x = x_t - t*F, then re-noise it to the next t with fresh noise.
`release` : the APEX authors' few-step sampler: jump straight to the data, x = x_t - t*F(x_t, t, c, tt = 0),
            then re-noise with fresh noise, on the grid `release_time_grid` (t = 0.999 first, then
            evenly down to 0.6 for 2 steps, to 0.5 otherwise, then 0).
A one-step generator trained with a target-time input (the `released` APEX variant) is sampled
with `flowmap`: at NFE = 1 that is x = z - F(z, 1, c, tt = 0).
Classifier-free guidance (guidance_scale s != 1) replaces every query F(., c) with
F(., u) + s * (F(., c) - F(., u)), u the empty prompt's states (a model trained with caption dropout).
"""

from typing import Optional

import torch
from tqdm import tqdm

METHODS = ("euler", "flowmap", "renoise", "release")


def time_grid(nfe: int, device=None) -> torch.Tensor:
    if nfe < 1:
        raise ValueError(f"--nfe must be >= 1, got {nfe}")
    return torch.linspace(1.0, 0.0, nfe + 1, device=device)


def release_time_grid(nfe: int, last: Optional[float] = None, device=None) -> torch.Tensor:
    """The released sampler's times: 0.999 (the first query never sits at t = 1), evenly down to
    ``last`` (0.6 for 2 steps, 0.5 otherwise: the authors' 2- and 4-NFE settings), then 0.
    2 steps: [0.999, 0.6, 0]; 4 steps: [0.999, 0.833, 0.667, 0.5, 0]."""
    if nfe < 1:
        raise ValueError(f"--nfe must be >= 1, got {nfe}")
    if last is None:
        last = 0.6 if nfe == 2 else 0.5
    head = torch.linspace(0.999, last, nfe, dtype=torch.float64) if nfe > 1 else torch.tensor([0.999], dtype=torch.float64)
    return torch.cat([head, torch.zeros(1, dtype=torch.float64)]).to(dtype=torch.float32, device=device)


@torch.no_grad()
def sample(model, noise: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None,
           nfe: int = 1, method: str = "flowmap", generator: Optional[torch.Generator] = None,
           guidance_scale: float = 1.0, uncond_context: Optional[torch.Tensor] = None,
           uncond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    if guidance_scale != 1.0:
        if uncond_context is None:
            raise ValueError(f"guidance scale {guidance_scale} needs the empty prompt's states (uncond_context)")
        model = _guided(model, guidance_scale, context, context_mask, uncond_context, uncond_mask)
    grid = release_time_grid(nfe, device=noise.device) if method == "release" else time_grid(nfe, device=noise.device)
    batch = noise.shape[0]
    x = noise
    for i in range(nfe):
        t, t_next = grid[i], grid[i + 1]
        t_vec = t.expand(batch)
        velocity = model(x, t_vec, context, context_mask, t_target=_target_time(method, t_next, batch))
        if method in ("renoise", "release"):
            x0 = x - t * velocity
            if i == nfe - 1:
                x = x0
            else:
                fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
                x = t_next * fresh + (1 - t_next) * x0
        else:
            x = x - (t - t_next) * velocity
    return x


def _target_time(method: str, t_next: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """tt of each query: the next grid time (flowmap), the data end (release), none = tt = t (euler, renoise)."""
    if method == "flowmap":
        return t_next.expand(batch)
    if method == "release":
        return torch.zeros_like(t_next).expand(batch)
    return None


def _guided(model, scale: float, context: torch.Tensor, context_mask: Optional[torch.Tensor],
            uncond: torch.Tensor, uncond_mask: Optional[torch.Tensor]):
    """The model under classifier-free guidance: one batched forward of [cond; uncond] per query."""
    n = context.shape[0]
    ones = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    uncond = uncond.to(context).expand(n, *context.shape[1:])
    uncond_mask = ones if uncond_mask is None else uncond_mask.to(context.device).expand(n, -1)
    both_context = torch.cat([context, uncond])
    both_mask = torch.cat([ones if context_mask is None else context_mask, uncond_mask])

    def guided(x, t, _context, _mask, t_target=None):
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both_context, both_mask,
                                 t_target=None if t_target is None else torch.cat([t_target, t_target])).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)
    return guided


def sample_seeded(model, context: torch.Tensor, context_mask: Optional[torch.Tensor], image_shape, nfe: int,
                  method: str = "flowmap", seed: int = 0, batch_size: int = 64, guidance_scale: float = 1.0,
                  uncond_context: Optional[torch.Tensor] = None, uncond_mask: Optional[torch.Tensor] = None,
                  progress: bool = False) -> torch.Tensor:
    """One image per context row from ``seed`` (on the host): all noise is drawn first, then
    sampled in batches sharing that generator, so a seed names the same images in every tool.
    ``progress``: a bar of the batches on stderr."""

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((context.shape[0], *image_shape), generator=gen)
    device = next(model.parameters()).device  # noise is drawn on the host: the same images on any device

    def on_device(x):
        return None if x is None else x.to(device)

    parts = []
    for start in tqdm(range(0, noise.shape[0], batch_size), desc=f"sample NFE={nfe}", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        rows = slice(start, start + batch_size)
        parts.append(sample(model, noise[rows].to(device), context[rows].to(device),
                            None if context_mask is None else context_mask[rows].to(device),
                            nfe=nfe, method=method, generator=gen, guidance_scale=guidance_scale,
                            uncond_context=on_device(uncond_context), uncond_mask=on_device(uncond_mask)).cpu())
    return torch.cat(parts)
