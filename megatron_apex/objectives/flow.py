"""The optimal-transport flow path shared by every objective (docs/apex_method.md).

Convention: ``t`` in [0, 1] with t = 1 pure noise and t = 0 data,
``x_t = t*z + (1-t)*x``, target velocity ``z - x``. Every function is shape-agnostic:
tensors are (B, ...) and per-sample times (B,) broadcast over the non-batch dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

TIME_KINDS = ("uniform", "logit_normal")
WEIGHTINGS = ("paper", "endpoint", "velocity")

# Weights divide by t; clamping t from below keeps them finite at t -> 0. The default time
# sampler never goes below t_min = 1e-3, so this clamp does not touch sampled times.
WEIGHT_T_EPS = 1e-4


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) times -> (B, 1, ..., 1) so they broadcast against ``like`` (B, ...)."""
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},) to match a batch of shape "
                         f"{tuple(like.shape)}, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """OT path point ``x_t = t*z + (1-t)*x``."""
    tb = expand_time(t, x0)
    return tb * noise + (1 - tb) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Conditional velocity of the OT path, ``d x_t / d t = z - x``."""
    return noise - x0


def endpoint(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Endpoint predictor f_x (Eq. 10): the data point reached by following ``velocity``
    in a straight line from ``x_t`` back to t = 0, ``x_t - t*v``."""
    return x_t - expand_time(t, x_t) * velocity


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every non-batch element -> (B,).

    Reduced in at least float32 so bf16/fp16 models do not lose the loss to rounding."""
    if a.shape != b.shape:
        raise ValueError(f"per_sample_mse: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(dim=1)


def flow_matching_error(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): ``||velocity - (z - x)||^2``, how far a velocity answered on the path
    from ``x0`` to ``noise`` is from that path's own velocity."""
    return per_sample_mse(velocity, velocity_target(x0, noise))


def mix_weight(t: torch.Tensor, kind: str, t_eps: float = WEIGHT_T_EPS) -> torch.Tensor:
    """Per-sample weight w(t) of the mixed consistency loss (Eq. 24), shape of ``t``.

    paper:    (1-t)/t      (1/omega(t), Eqs. 16, 20-24; 0 at t = 1)
    endpoint: 1            (uniform in endpoint space)
    velocity: 1/t^2        (uniform in velocity space: ||f_x(F) - T||^2 = t^2 ||F - v||^2)
    ``t`` is clamped to ``t_eps`` from below in the denominators only.
    """
    if kind not in WEIGHTINGS:
        raise ValueError(f"weighting {kind!r}: unknown; choose one of {WEIGHTINGS}")
    t_safe = t.clamp(min=t_eps)
    if kind == "paper":
        return (1 - t) / t_safe
    if kind == "endpoint":
        return torch.ones_like(t)
    return 1 / t_safe.pow(2)


@dataclass
class TimeSamplerConfig:
    """How training times are drawn (not fixed by the paper; docs/apex_method.md).

    kind: "uniform" on [t_min, 1], or "logit_normal" (SD3 style: sigmoid(N(logit_mean,
          logit_std^2)), clamped to [t_min, 1]).
    frac_at_one: probability that a sample's time is set to exactly 1 (the one-step case);
          drawn per sample so the expected fraction is right for any batch size.
    """

    kind: str = "uniform"
    t_min: float = 1e-3
    logit_mean: float = 0.0
    logit_std: float = 1.0
    frac_at_one: float = 0.0

    def __post_init__(self):
        if self.kind not in TIME_KINDS:
            raise ValueError(f"TimeSamplerConfig.kind {self.kind!r}: unknown; choose one of {TIME_KINDS}")
        if not (0.0 <= self.t_min < 1.0):
            raise ValueError(f"TimeSamplerConfig.t_min must be in [0, 1), got {self.t_min}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError(f"TimeSamplerConfig.logit_std must be > 0, got {self.logit_std}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"TimeSamplerConfig.logit_mean must be finite, got {self.logit_mean}")
        if not (0.0 <= self.frac_at_one <= 1.0):
            raise ValueError(f"TimeSamplerConfig.frac_at_one must be in [0, 1], got {self.frac_at_one}")


def draw_device(generator: Optional[torch.Generator]) -> torch.device:
    """Where random draws happen: the generator's device, the CPU (global RNG) without one, so the
    same seed gives the same numbers whatever device the result goes to."""
    return generator.device if generator is not None else torch.device("cpu")


def sample_time(batch_size: int, cfg: TimeSamplerConfig,
                generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Draw (batch_size,) float32 times from ``cfg``.

    Draws happen on the generator's device (CPU without one) in this order: the base
    times, then the t = 1 coin flips; the result is then moved to ``device``."""
    if batch_size < 1:
        raise ValueError(f"sample_time: batch_size must be >= 1, got {batch_size}")
    kw = dict(generator=generator, device=draw_device(generator), dtype=torch.float32)
    if cfg.kind == "uniform":
        t = cfg.t_min + (1 - cfg.t_min) * torch.rand(batch_size, **kw)
    else:
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch_size, **kw))
        t = t.clamp(min=cfg.t_min, max=1.0)
    at_one = torch.rand(batch_size, **kw) < cfg.frac_at_one
    t = torch.where(at_one, torch.ones_like(t), t)
    return t.to(device) if device is not None else t
