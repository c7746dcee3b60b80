"""APEX: self-adversarial one-step generation via condition shifting (arXiv 2604.12322).

The math is docs/apex_method.md; function names follow the paper's equations.
The condition shift (Eq. 9) is a model part (models/common/condition_shift.py): an objective
only asks for it with ``fake_condition``. Read top to bottom:
  1. APEXConfig.
  2. Variant "paper": Eqs. 11, 12, 14, 20-25.
  3. Variant "released": the authors' released mechanism (docs/apex_method.md).
  4. apex_loss: the entry point.
  5. The two-phase decomposition (what pipeline parallelism runs).

Model contract (docs/apex_method.md): ``model(x_t, t, context, context_mask=None,
fake_condition=False, t_target=None)`` -> velocity shaped like x_t; t in [0, 1], 1 = noise;
``fake_condition`` a python bool or a (B,) bool tensor; ``t_target`` the any-step target time
(None = t, a plain velocity query). Any callable with that signature works.

Reduction everywhere: squared norms averaged over the non-batch elements, then the batch.
A term whose weight is 0 (or that is held off) is not evaluated and is reported as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_apex.models.common.condition_shift import FakeCondition
from megatron_apex.objectives.flow import (WEIGHT_T_EPS, WEIGHTINGS, endpoint, expand_time, interpolate,
                                           mix_weight, per_sample_mse, velocity_target)

# ============================================================================================
# 1. Configuration
# ============================================================================================

VARIANTS = ("paper", "released")
FAKE_GRADS = ("detach", "through")


@dataclass
class APEXConfig:
    """Everything apex_loss needs; validated on construction.

    Shared
      variant:   "paper" (the paper's Eqs. 11-25) or "released" (the authors' released
                 mechanism, docs/apex_method.md).
      shift_a, shift_b: c_fake = shift_a*c + shift_b. Read by whoever builds the model's
                 ConditionShift; apex_loss itself only passes fake_condition=True.
    Variant "paper"
      lam:       mix of the Eq. 23 target, in [0, 1] (0 = data endpoint only).
      lambda_p, lambda_e: weights of L_fake and L_mix in the total (Eq. 25).
      weighting: w(t) of L_mix: "paper" (1-t)/t, "endpoint" 1, "velocity" 1/t^2.
      fake_grad: "detach" stops gradients through x_fake in L_fake (released code, what a
                 pipeline-parallel schedule can run); "through" keeps them in the fake
                 trajectory's input and target (paper text: dx_fake/dtheta = -t dF/dtheta).
    Variant "released"
      w_base, w_fake, w_dm: weights of the base flow-matching loss on data, the fake flow on
                 generated samples, the distribution-matching correction (release: 0.5; the
                 spec's working CPU trial: 1.0 with the clamp).
      dm_clamp:  g is clamped to [-dm_clamp, dm_clamp] (release: 1.0); None = no clamp.
      dm_normalize: divide g per sample by its RMS over the non-batch elements (applied
                 before the clamp; set dm_clamp=None for normalisation alone).
      dm_warmup_steps: the DM term is held off while step < dm_warmup_steps, so the fake
                 branch first adapts to c_fake (spec: ~80); needs apex_loss's ``step``.
      fresh_t_min, fresh_t_max: the fresh times t', t'' are uniform on this interval.
      cfg_scale: r of the CFG-enhanced base target z - x + r*sg(F(x_t,t,c) - F(x_t,t,uncond))
                 (release: 0.8), queried on the teacher (the model itself when none);
                 0 = off; > 0 needs apex_loss's ``uncond_context``.
      w_consistency: weight of an any-step flow-map self-consistency term (a one-Euler-step
                 stand-in for the release's RCGM target), on the base rows: the jump
                 F(x_t, t, c, tt=0) gets the gradient of the residual of "a step of size
                 consistency_step along the model's own velocity, then the model's jump from
                 there to 0" (see flow_map_consistency_loss). 0 = off.
      consistency_step: the Euler step size of that term, in (0, 1).
      consistency_clamp: the residual is clamped to [-c, c] (release: 1.0); None = off.
      batch_split: None = every sample feeds every term. A fraction f in (0, 1) splits the
                 rows: the first round(f*B) rows (at least 1) feed the one-step generator and
                 the terms built on it (fake flow, DM) with their noise as the generator's z;
                 the remaining rows (at least 1) feed the base flow matching (and consistency)
                 terms.
      fuse_forwards: run the base and fake-flow queries as one batched forward with a
                 per-sample fake_condition (and the DM fake/real queries too when no teacher
                 is given); False = separate forwards. Same numbers either way.
    """

    variant: str = "paper"
    shift_a: float = -1.0
    shift_b: float = 0.0
    # ---- variant "paper"
    lam: float = 0.5
    lambda_p: float = 1.0
    lambda_e: float = 1.0
    weighting: str = "paper"
    fake_grad: str = "detach"
    # ---- variant "released"
    w_base: float = 1.0
    w_fake: float = 1.0
    w_dm: float = 0.5
    dm_clamp: Optional[float] = 1.0
    dm_normalize: bool = False
    dm_warmup_steps: int = 0
    fresh_t_min: float = 1e-3
    fresh_t_max: float = 1.0
    cfg_scale: float = 0.0
    w_consistency: float = 0.0
    consistency_step: float = 0.01
    consistency_clamp: Optional[float] = 1.0
    batch_split: Optional[float] = None
    fuse_forwards: bool = True

    def __post_init__(self):
        def fail(name, why):
            raise ValueError(f"APEXConfig.{name} {why}, got {getattr(self, name)!r}")

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
            return float(value)

        if self.variant not in VARIANTS:
            fail("variant", f"must be one of {VARIANTS}")
        if self.weighting not in WEIGHTINGS:
            fail("weighting", f"must be one of {WEIGHTINGS}")
        if self.fake_grad not in FAKE_GRADS:
            fail("fake_grad", f"must be one of {FAKE_GRADS}")
        number("shift_a"), number("shift_b")
        if not 0.0 <= number("lam") <= 1.0:
            fail("lam", "must be in [0, 1]")
        for name in ("lambda_p", "lambda_e", "w_base", "w_fake", "w_dm", "cfg_scale", "w_consistency"):
            if number(name) < 0:
                fail(name, "must be >= 0")
        if self.dm_clamp is not None and number("dm_clamp") <= 0:
            fail("dm_clamp", "must be > 0 (or None for no clamp)")
        if not isinstance(self.dm_normalize, bool):
            fail("dm_normalize", "must be a bool")
        if isinstance(self.dm_warmup_steps, bool) or not isinstance(self.dm_warmup_steps, int) \
                or self.dm_warmup_steps < 0:
            fail("dm_warmup_steps", "must be an integer >= 0")
        if not 0.0 < number("fresh_t_min") < 1.0:
            fail("fresh_t_min", "must be in (0, 1)")
        if not self.fresh_t_min < number("fresh_t_max") <= 1.0:
            fail("fresh_t_max", "must be in (fresh_t_min, 1]")
        if not 0.0 < number("consistency_step") < 1.0:
            fail("consistency_step", "must be in (0, 1)")
        if self.consistency_clamp is not None and number("consistency_clamp") <= 0:
            fail("consistency_clamp", "must be > 0 (or None for no clamp)")
        if self.batch_split is not None and not 0.0 < number("batch_split") < 1.0:
            fail("batch_split", "must be None or in (0, 1)")
        if not isinstance(self.fuse_forwards, bool):
            fail("fuse_forwards", "must be a bool")
        if self.variant == "paper":
            for name, off in (("cfg_scale", 0.0), ("w_consistency", 0.0), ("batch_split", None)):
                if getattr(self, name) != off:
                    fail(name, "only acts in variant 'released'; leave it at its default for 'paper'")


def call_model(model: Callable, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               context_mask: Optional[torch.Tensor] = None, fake_condition: FakeCondition = False,
               t_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query of the model contract; ``t_target`` is only passed when set, so velocity
    queries also work on callables written without the any-step input."""
    kwargs = dict(context_mask=context_mask, fake_condition=fake_condition)
    if t_target is not None:
        kwargs["t_target"] = t_target
    return model(x_t, t, context, **kwargs)


# ============================================================================================
# 2. Variant "paper": the paper's equations
# ============================================================================================

def fake_sample(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``x_fake = x_t - t*F(x_t, t, c)``, the model's own one-jump endpoint."""
    return endpoint(velocity, x_t, t)


def fake_trajectory(x_fake: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t_fake = t*z + (1-t)*x_fake`` (same z, same t as the real point)."""
    return interpolate(x_fake, noise, t)


def fake_flow_loss(model: Callable, x_fake: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 12, per sample (B,): ``||F(x_t_fake, t, c_fake) - (z - x_fake)||^2``, unweighted.

    Gradients through ``x_fake`` are whatever the caller left on it (detach or not)."""
    x_t_fake = fake_trajectory(x_fake, noise, t)
    v = call_model(model, x_t_fake, t, context, context_mask, fake_condition=True)
    return per_sample_mse(v, velocity_target(x_fake, noise))


@torch.no_grad()
def fake_velocity_reference(model: Callable, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                            context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 14: ``v_fake = sg(F(x_t, t, c_fake))`` at the REAL trajectory point, no gradient."""
    return call_model(model, x_t, t, context, context_mask, fake_condition=True).detach()


def mixed_target(x0: torch.Tensor, v_fake: Optional[torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                 lam: float) -> torch.Tensor:
    """Eq. 23: ``T_mix = (1-lam)*x + lam*f_x(v_fake, x_t, t)`` (v_fake may be None at lam = 0)."""
    if lam == 0:
        return x0
    if v_fake is None:
        raise ValueError(f"mixed_target: lam={lam} > 0 needs v_fake")
    return (1 - lam) * x0 + lam * endpoint(v_fake.detach(), x_t, t)


def mixed_consistency_loss(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                           target: torch.Tensor, weighting: str) -> torch.Tensor:
    """Eq. 24, per sample (B,): ``w(t) * ||f_x(F(x_t,t,c), x_t, t) - T_mix||^2``."""
    return mix_weight(t, weighting) * per_sample_mse(endpoint(velocity, x_t, t), target)


def supervised_loss(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                    weighting: str) -> torch.Tensor:
    """Eq. 20, per sample: ``w(t) * ||f_x(F) - x||^2`` (= w t^2 ||F - (z-x)||^2, weighted FM)."""
    return mix_weight(t, weighting) * per_sample_mse(endpoint(velocity, x_t, t), x0)


def consistency_loss(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_fake: torch.Tensor,
                     weighting: str) -> torch.Tensor:
    """Eqs. 21-22, per sample: ``w(t) * ||f_x(F) - f_x(sg(v_fake))||^2``.

    Theorem 1: grad L_mix = grad((1-lam) L_sup + lam L_cons) for every parameter. The identity
    is per sample and linear in w, so it holds for any w(t) shared by the three terms (the
    paper states it with w = 1/omega(t)); the values differ by a theta-free constant."""
    return mix_weight(t, weighting) * per_sample_mse(endpoint(velocity, x_t, t),
                                                     endpoint(v_fake.detach(), x_t, t))


def apex_total(l_fake: torch.Tensor, l_mix: torch.Tensor, lambda_p: float, lambda_e: float) -> torch.Tensor:
    """Eq. 25: ``L_APEX = lambda_p * L_fake + lambda_e * L_mix``."""
    return lambda_p * l_fake + lambda_e * l_mix


def paper_apex_loss(model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    context: torch.Tensor, context_mask: Optional[torch.Tensor],
                    cfg: APEXConfig) -> Dict[str, torch.Tensor]:
    """Variant "paper": returns ``loss``, ``l_fake`` (Eq. 12), ``l_mix`` (Eq. 24)."""
    x_t = interpolate(x0, noise, t)
    velocity = call_model(model, x_t, t, context, context_mask)  # F(x_t, t, c)

    v_fake = fake_velocity_reference(model, x_t, t, context, context_mask) if cfg.lam > 0 else None
    target = mixed_target(x0, v_fake, x_t, t, cfg.lam)
    l_mix = mixed_consistency_loss(velocity, x_t, t, target, cfg.weighting).mean()

    if cfg.lambda_p > 0:
        x_fake = fake_sample(velocity, x_t, t)
        if cfg.fake_grad == "detach":
            x_fake = x_fake.detach()
        l_fake = fake_flow_loss(model, x_fake, noise, t, context, context_mask).mean()
    else:
        l_fake = l_mix.new_zeros(())

    return {"loss": apex_total(l_fake, l_mix, cfg.lambda_p, cfg.lambda_e), "l_fake": l_fake, "l_mix": l_mix}


# ============================================================================================
# 3. Variant "released": the authors' released mechanism (docs/apex_method.md)
# ============================================================================================

@dataclass
class FreshDraws:
    """The released variant's fresh randomness for the n generator rows."""

    t_fake: torch.Tensor  # t'  (n,)  fake flow
    z_fake: torch.Tensor  # z'  (n, ...)
    t_dm: torch.Tensor    # t'' (n,)  distribution matching
    z_dm: torch.Tensor    # z'' (n, ...)


def draw_fresh(n: int, sample_shape: Tuple[int, ...], cfg: APEXConfig, generator: Optional[torch.Generator],
               device: torch.device, dtype: torch.dtype, t_dtype: torch.dtype) -> FreshDraws:
    """Draw, in this order, u' (n,), z' (n, *sample_shape), u'' (n,), z'' (n, *sample_shape)
    on the generator's device (CPU without a generator -> the global CPU RNG), in at least
    float32 (the input dtype when wider), then move them to ``device``/``dtype``.
    Times are ``fresh_t_min + (fresh_t_max - fresh_t_min) * u``. All four are always drawn,
    so the stream does not depend on which terms are on."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    x_draw = torch.promote_types(dtype, torch.float32)
    t_draw = torch.promote_types(t_dtype, torch.float32)
    span = cfg.fresh_t_max - cfg.fresh_t_min

    def times():
        u = torch.rand(n, generator=generator, device=draw_device, dtype=t_draw)
        return (cfg.fresh_t_min + span * u).to(device=device, dtype=t_dtype)

    def noise():
        z = torch.randn((n, *sample_shape), generator=generator, device=draw_device, dtype=x_draw)
        return z.to(device=device, dtype=dtype)

    t_fake = times()
    z_fake = noise()
    t_dm = times()
    z_dm = noise()
    return FreshDraws(t_fake, z_fake, t_dm, z_dm)


def split_rows(batch_size: int, batch_split: Optional[float]) -> Tuple[slice, slice]:
    """(generator rows, base rows) of a batch; see APEXConfig.batch_split."""
    if batch_split is None:
        return slice(None), slice(None)
    if batch_size < 2:
        raise ValueError(f"APEXConfig.batch_split={batch_split} needs a batch of at least 2 samples, "
                         f"got {batch_size}")
    n_gen = min(max(int(round(batch_split * batch_size)), 1), batch_size - 1)
    return slice(0, n_gen), slice(n_gen, None)


def one_step_generation(model: Callable, noise: torch.Tensor, context: torch.Tensor,
                        context_mask: Optional[torch.Tensor], t_dtype: torch.dtype = torch.float32
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Point 2: ``F_g = F(z, 1, c, tt=0)``, ``x_g = z - F_g`` (gradient kept on F_g)."""
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=t_dtype)
    f_g = call_model(model, noise, ones, context, context_mask, t_target=torch.zeros_like(ones))
    return f_g, noise - f_g


@torch.no_grad()
def cfg_enhanced_target(reference: Callable, target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        context: torch.Tensor, context_mask: Optional[torch.Tensor],
                        uncond_context: torch.Tensor, uncond_context_mask: Optional[torch.Tensor],
                        scale: float) -> torch.Tensor:
    """Point 5: ``target + r * sg(F(x_t, t, c) - F(x_t, t, uncond))``."""
    v_cond = call_model(reference, x_t, t, context, context_mask)
    v_uncond = call_model(reference, x_t, t, uncond_context, uncond_context_mask)
    return target + scale * (v_cond - v_uncond)


def fake_flow_on_generated(model: Callable, x_g: torch.Tensor, z_fake: torch.Tensor, t_fake: torch.Tensor,
                           context: torch.Tensor, context_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Point 3, per sample: ``||F(x'_t, t', c_fake) - (z' - sg(x_g))||^2`` with
    ``x'_t = t' z' + (1-t') sg(x_g)``. (apex_loss may run this query fused with the base one.)"""
    x_g = x_g.detach()
    v = call_model(model, interpolate(x_g, z_fake, t_fake), t_fake, context, context_mask, fake_condition=True)
    return per_sample_mse(v, velocity_target(x_g, z_fake))


@torch.no_grad()
def distribution_matching_direction(model: Callable, teacher: Optional[Callable], x_g: torch.Tensor,
                                    z_dm: torch.Tensor, t_dm: torch.Tensor, context: torch.Tensor,
                                    context_mask: Optional[torch.Tensor], cfg: APEXConfig) -> torch.Tensor:
    """Point 4: ``g = sg(F(y, t'', c_fake) - F_real(y, t'', c))`` at
    ``y = t'' z'' + (1-t'') sg(x_g)``, normalised and/or clamped per cfg (float32 or wider).

    F_real is ``teacher`` (e.g. a frozen copy) or, when None, the model itself.
    Why this sign moves x_g toward the data: for the OT path v(y) = (y - E[x|y]) / t, so
    v_fake - v_real = (E_real[x|y] - E_fake[x|y]) / t points from the generated toward the
    real distribution; the loss puts gradient +g on F_g, and x_g = z - F_g, so a descent step
    moves x_g by +eta*g."""
    y = interpolate(x_g.detach(), z_dm, t_dm)
    if teacher is None and cfg.fuse_forwards:
        n = y.shape[0]
        fake_rows = torch.arange(2 * n, device=y.device) < n
        v = call_model(model, torch.cat([y, y]), torch.cat([t_dm, t_dm]), torch.cat([context, context]),
                       _cat_masks(context_mask, context_mask), fake_condition=fake_rows)
        v_fake, v_real = v[:n], v[n:]
    else:
        v_fake = call_model(model, y, t_dm, context, context_mask, fake_condition=True)
        v_real = call_model(teacher if teacher is not None else model, y, t_dm, context, context_mask)
    return dm_direction_from_velocities(v_fake, v_real, cfg)


@torch.no_grad()
def dm_direction_from_velocities(v_fake: torch.Tensor, v_real: torch.Tensor, cfg: APEXConfig) -> torch.Tensor:
    """Point 4's ``g = v_fake - v_real`` (float32 or wider), normalised and/or clamped per cfg."""
    g = v_fake.to(torch.promote_types(v_fake.dtype, torch.float32)) - v_real
    if cfg.dm_normalize:
        rms = g.pow(2).flatten(1).mean(dim=1).sqrt().clamp_min(1e-12)
        g = g / expand_time(rms, g)
    if cfg.dm_clamp is not None:
        g = g.clamp(-cfg.dm_clamp, cfg.dm_clamp)
    return g


def distribution_matching_loss(f_g: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Point 4, per sample: ``||F_g - sg(F_g - g)||^2``; its gradient on F_g is 2g/N
    (N = elements per sample) and its value is mean(g^2)."""
    target = f_g.detach().to(g.dtype) - g
    return per_sample_mse(f_g, target)


def flow_map_consistency_loss(model: Callable, x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor,
                              context: torch.Tensor, context_mask: Optional[torch.Tensor],
                              step: float, clamp: Optional[float] = 1.0) -> torch.Tensor:
    """Point 5 (optional), per sample: ``||u - sg(u - R)||^2`` (gradient R on the jump
    u = F(x_t, t, c, tt=0); value mean(R^2)), with v = sg(F(x_t, t, c)) the model's own
    velocity, s = max(t - step, 0), x_s = x_t - (t-s) v and the residual of the two-segment
    identity t*u(x_t) = (t-s)*v + s*u(x_s):
        R = clamp((t*u - (t-s)*v - s*sg(F(x_s, s, c, tt=0))) / (t-s)).
    Dividing by the segment length keeps R from shrinking with the step (as the release's
    RCGM target does; R -> u - v + t du/dt as step -> 0); at t <= step, R = u - v."""
    zeros = torch.zeros_like(t)
    jump = call_model(model, x_t, t, context, context_mask, t_target=zeros)
    with torch.no_grad():
        v = velocity.detach()
        s = (t - step).clamp(min=0)
        x_s = x_t - expand_time(t - s, x_t) * v
        jump_s = call_model(model, x_s, s, context, context_mask, t_target=zeros)
        residual = (expand_time(t, x_t) * jump - expand_time(t - s, x_t) * v - expand_time(s, x_t) * jump_s) \
            / expand_time((t - s).clamp(min=WEIGHT_T_EPS), x_t)
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        if clamp is not None:
            residual = residual.clamp(-clamp, clamp)
    return per_sample_mse(jump, jump.detach().to(residual.dtype) - residual)


def dm_held_off(cfg: APEXConfig, step: Optional[int]) -> bool:
    """Whether the DM term is still held off at ``step`` (APEXConfig.dm_warmup_steps)."""
    if cfg.dm_warmup_steps == 0:
        return False
    if step is None:
        raise ValueError(f"APEXConfig.dm_warmup_steps={cfg.dm_warmup_steps} needs apex_loss's step kwarg")
    return step < cfg.dm_warmup_steps


def _cat_masks(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("context_mask: either every fused query has one or none has")
    return torch.cat([a, b])


def _rows(x: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if x is None else x[rows]


def _fit_rows(x: Optional[torch.Tensor], n: int, rows: slice, batch_size: int, name: str) -> Optional[torch.Tensor]:
    """A per-sample kwarg of batch 1 (broadcast) or of the full batch (take ``rows``)."""
    if x is None:
        return None
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    if x.shape[0] != batch_size:
        raise ValueError(f"{name} must have batch size 1 or {batch_size}, got {x.shape[0]}")
    return x[rows]


def released_apex_loss(model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       context: torch.Tensor, context_mask: Optional[torch.Tensor], cfg: APEXConfig, *,
                       generator: Optional[torch.Generator] = None, teacher: Optional[Callable] = None,
                       step: Optional[int] = None, uncond_context: Optional[torch.Tensor] = None,
                       uncond_context_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Variant "released": returns ``loss``, ``l_base``, ``l_fake``, ``l_dm`` (and
    ``l_consistency`` when w_consistency > 0)."""
    if cfg.cfg_scale > 0 and uncond_context is None:
        raise ValueError(f"APEXConfig.cfg_scale={cfg.cfg_scale} needs apex_loss's uncond_context kwarg "
                         "(the unconditional / empty-prompt context)")
    batch = x0.shape[0]
    dm_on = cfg.w_dm > 0 and not dm_held_off(cfg, step)
    gen_rows, base_rows = split_rows(batch, cfg.batch_split)

    z_g, c_g, m_g = noise[gen_rows], context[gen_rows], _rows(context_mask, gen_rows)
    fresh = draw_fresh(z_g.shape[0], tuple(z_g.shape[1:]), cfg, generator, x0.device, x0.dtype, t.dtype)

    # 2. One-step generation; its graph is only needed by the DM term.
    with torch.set_grad_enabled(dm_on and torch.is_grad_enabled()):
        f_g, x_g = one_step_generation(model, z_g, c_g, m_g, t.dtype)
    x_g = x_g.detach()  # every later use is sg(x_g)

    # 1. Base flow matching on data trajectories (optionally with a CFG-enhanced target).
    x_b, z_b, t_b = x0[base_rows], noise[base_rows], t[base_rows]
    c_b, m_b = context[base_rows], _rows(context_mask, base_rows)
    x_t = interpolate(x_b, z_b, t_b)
    base_target = velocity_target(x_b, z_b)
    if cfg.cfg_scale > 0:
        n_b = x_b.shape[0]
        uc = _fit_rows(uncond_context, n_b, base_rows, batch, "uncond_context")
        um = _fit_rows(uncond_context_mask, n_b, base_rows, batch, "uncond_context_mask")
        base_target = cfg_enhanced_target(teacher if teacher is not None else model, base_target, x_t, t_b,
                                          c_b, m_b, uc, um, cfg.cfg_scale)

    # 3. Fake flow on fresh trajectories from sg(x_g), under c_fake.
    fake_on = cfg.w_fake > 0
    if fake_on and cfg.fuse_forwards:
        x_t_fake = interpolate(x_g, fresh.z_fake, fresh.t_fake)
        n_b = x_t.shape[0]
        fake_rows = torch.arange(n_b + x_t_fake.shape[0], device=x_t.device) >= n_b
        v = call_model(model, torch.cat([x_t, x_t_fake]), torch.cat([t_b, fresh.t_fake]), torch.cat([c_b, c_g]),
                       _cat_masks(m_b, m_g), fake_condition=fake_rows)
        v_base, v_fake = v[:n_b], v[n_b:]
        l_fake = per_sample_mse(v_fake, velocity_target(x_g, fresh.z_fake)).mean()
    else:
        v_base = call_model(model, x_t, t_b, c_b, m_b)
        l_fake = (fake_flow_on_generated(model, x_g, fresh.z_fake, fresh.t_fake, c_g, m_g).mean()
                  if fake_on else None)
    l_base = per_sample_mse(v_base, base_target).mean()
    zero = l_base.new_zeros(())
    l_fake = zero if l_fake is None else l_fake

    # 4. Distribution-matching correction: gradient g on F_g.
    if dm_on:
        g = distribution_matching_direction(model, teacher, x_g, fresh.z_dm, fresh.t_dm, c_g, m_g, cfg)
        l_dm = distribution_matching_loss(f_g, g).mean()
    else:
        l_dm = zero

    loss = cfg.w_base * l_base + cfg.w_fake * l_fake + cfg.w_dm * l_dm
    terms = {"l_base": l_base, "l_fake": l_fake, "l_dm": l_dm}
    if cfg.w_consistency > 0:
        terms["l_consistency"] = flow_map_consistency_loss(model, x_t, t_b, v_base, c_b, m_b,
                                                           cfg.consistency_step, cfg.consistency_clamp).mean()
        loss = loss + cfg.w_consistency * terms["l_consistency"]
    return {"loss": loss, **terms}


# ============================================================================================
# 4. Entry point
# ============================================================================================

def apex_loss(model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              context: torch.Tensor, context_mask: Optional[torch.Tensor], cfg: APEXConfig, *,
              generator: Optional[torch.Generator] = None, teacher: Optional[Callable] = None,
              step: Optional[int] = None, uncond_context: Optional[torch.Tensor] = None,
              uncond_context_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The APEX objective for any callable with the model contract; a dict of scalar tensors.

    variant "paper":    loss, l_fake, l_mix.
    variant "released": loss, l_base, l_fake, l_dm (+ l_consistency). Fresh noise and times
                        come from ``generator`` (reproducible); ``teacher`` supplies the real
                        velocity of the DM query (None = the model itself, under no_grad);
                        ``step`` drives dm_warmup_steps; ``uncond_context`` feeds cfg_scale.
    The paper variant ignores generator, teacher and step (it draws nothing fresh)."""
    if not isinstance(cfg, APEXConfig):
        raise ValueError(f"apex_loss: cfg must be an APEXConfig, got {type(cfg).__name__}")
    if noise.shape != x0.shape:
        raise ValueError(f"apex_loss: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    if tuple(t.shape) != (x0.shape[0],):
        raise ValueError(f"apex_loss: t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if context.shape[0] != x0.shape[0]:
        raise ValueError(f"apex_loss: context batch {context.shape[0]} != x0 batch {x0.shape[0]}")
    if cfg.variant == "paper":
        return paper_apex_loss(model, x0, noise, t, context, context_mask, cfg)
    return released_apex_loss(model, x0, noise, t, context, context_mask, cfg, generator=generator,
                              teacher=teacher, step=step, uncond_context=uncond_context,
                              uncond_context_mask=uncond_context_mask)


# ============================================================================================
# 5. Two-phase decomposition (what pipeline parallelism can run)
# ============================================================================================
# Under pipeline parallelism a model output exists only after a whole pass through every
# stage, so a query whose INPUT depends on another query's output (x_fake from F(x_t, t, c);
# the DM point y from the one-step sample x_g) cannot run in the same pass. The objective is
# split into rounds of no-grad queries (each round one batched forward-only pass) and then ONE
# training pass that batches every query that needs a gradient. Only sg(x_fake) can cross
# from a no-grad round into the training pass, hence fake_grad="detach". With the same draws
# the terms equal apex_loss's up to floating-point batching.

@dataclass
class ModelQuery:
    """One batch of model-contract inputs. ``teacher``: answered by the teacher (no-grad
    rounds only)."""

    x_t: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    context_mask: Optional[torch.Tensor] = None
    fake_condition: bool = False
    t_target: Optional[torch.Tensor] = None
    teacher: bool = False

    @property
    def rows(self) -> int:
        return self.x_t.shape[0]


def batch_queries(queries) -> ModelQuery:
    """The queries as one batched call: rows in order, a per-row fake_condition (a python bool
    when every query agrees), ``t_target`` = t for queries without one (tt = t is exactly a
    plain velocity query)."""
    queries = list(queries)
    if not queries:
        raise ValueError("batch_queries: no queries")
    if len(queries) == 1:
        return queries[0]
    flags = {bool(q.fake_condition) for q in queries}
    if len(flags) == 1:
        fake: FakeCondition = flags.pop()
    else:
        fake = torch.cat([torch.full((q.rows,), bool(q.fake_condition), dtype=torch.bool, device=q.x_t.device)
                          for q in queries])
    masks = [q.context_mask for q in queries]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("context_mask: either every batched query has one or none has")
    targets = None
    if any(q.t_target is not None for q in queries):
        targets = torch.cat([q.t if q.t_target is None else q.t_target.to(q.t.dtype) for q in queries])
    return ModelQuery(torch.cat([q.x_t for q in queries]), torch.cat([q.t for q in queries]),
                      torch.cat([q.context for q in queries]),
                      None if masks[0] is None else torch.cat(masks), fake, targets)


def answer_query(model: Callable, query: ModelQuery) -> torch.Tensor:
    return call_model(model, query.x_t, query.t, query.context, query.context_mask,
                      fake_condition=query.fake_condition, t_target=query.t_target)


def split_output(output: torch.Tensor, queries) -> list:
    """Inverse of batch_queries on the batched call's output."""
    return list(torch.split(output, [q.rows for q in queries], dim=0))


class TwoPhaseObjective:
    """One micro-batch of an objective as rounds of no-grad queries plus one training pass.

    Protocol: for r in range(num_rounds): ``receive(r, outputs of nograd_queries(r))``; then
    ``loss(outputs of train_queries())`` -> the same dict of terms apex_loss returns."""

    num_rounds = 0

    def nograd_queries(self, round_index: int) -> list:
        raise IndexError(round_index)

    def receive(self, round_index: int, outputs: list) -> None:
        raise IndexError(round_index)

    def train_queries(self) -> list:
        raise NotImplementedError

    def loss(self, outputs: list) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class PaperTwoPhase(TwoPhaseObjective):
    """Variant "paper": round 0 = [F(x_t, t, c) (for x_fake, Eq. 11), F(x_t, t, c_fake) (v_fake,
    Eq. 14)]; training pass = [real branch (x_t, c), fake branch (x_t_fake, c_fake)]."""

    def __init__(self, x0, noise, t, context, context_mask, cfg: APEXConfig):
        if cfg.fake_grad != "detach":
            raise ValueError(f"APEXConfig.fake_grad={cfg.fake_grad!r}: the two-phase (pipeline-parallel) APEX step "
                             "cannot carry gradients through x_fake; use fake_grad='detach'")
        self.x0, self.noise, self.t, self.c, self.m, self.cfg = x0, noise, t, context, context_mask, cfg
        self.x_t = interpolate(x0, noise, t)
        self.fake_on, self.mix_on = cfg.lambda_p > 0, cfg.lam > 0
        self.num_rounds = int(self.fake_on or self.mix_on)
        self.x_fake = self.v_fake = None

    def _real(self, fake: bool) -> ModelQuery:
        return ModelQuery(self.x_t, self.t, self.c, self.m, fake_condition=fake)

    def nograd_queries(self, round_index):
        if round_index >= self.num_rounds:
            raise IndexError(round_index)
        return [self._real(False)] * self.fake_on + [self._real(True)] * self.mix_on

    def receive(self, round_index, outputs):
        outputs = list(outputs)
        if self.fake_on:
            self.x_fake = fake_sample(outputs.pop(0), self.x_t, self.t).detach()
        if self.mix_on:
            self.v_fake = outputs.pop(0).detach()

    def train_queries(self):
        queries = [self._real(False)]
        if self.fake_on:
            queries.append(ModelQuery(fake_trajectory(self.x_fake, self.noise, self.t), self.t, self.c, self.m,
                                      fake_condition=True))
        return queries

    def loss(self, outputs):
        cfg = self.cfg
        velocity = outputs[0]
        target = mixed_target(self.x0, self.v_fake, self.x_t, self.t, cfg.lam)
        l_mix = mixed_consistency_loss(velocity, self.x_t, self.t, target, cfg.weighting).mean()
        if self.fake_on:
            l_fake = per_sample_mse(outputs[1], velocity_target(self.x_fake, self.noise)).mean()
        else:
            l_fake = l_mix.new_zeros(())
        return {"loss": apex_total(l_fake, l_mix, cfg.lambda_p, cfg.lambda_e), "l_fake": l_fake, "l_mix": l_mix}


class ReleasedTwoPhase(TwoPhaseObjective):
    """Variant "released": round 0 = the one-step samples F(z, 1, c, tt=0) -> sg(x_g); round 1
    (DM on) = the distribution-matching queries at y (fake: model under c_fake; real: the
    teacher, or the model when there is none) -> g; training pass = [data branch, one-step
    branch (its DM target sg(F_g) - g), fake branch]. ``teacher``: whether a teacher answers
    the real DM query. CFG-enhanced targets and the consistency term need further rounds and
    are not decomposed."""

    def __init__(self, x0, noise, t, context, context_mask, cfg: APEXConfig, *,
                 generator: Optional[torch.Generator] = None, teacher: bool = False, step: Optional[int] = None):
        for name, off in (("cfg_scale", 0.0), ("w_consistency", 0.0)):
            if getattr(cfg, name) != off:
                raise ValueError(f"APEXConfig.{name}={getattr(cfg, name)} is not available in the two-phase "
                                 "(pipeline-parallel) APEX step; leave it at its default")
        self.cfg, self.teacher = cfg, teacher
        batch = x0.shape[0]
        self.dm_on = cfg.w_dm > 0 and not dm_held_off(cfg, step)
        self.fake_on = cfg.w_fake > 0
        gen_rows, base_rows = split_rows(batch, cfg.batch_split)
        self.z_g, self.c_g, self.m_g = noise[gen_rows], context[gen_rows], _rows(context_mask, gen_rows)
        # drawn exactly as released_apex_loss draws them: the same generator gives the same numbers
        self.fresh = draw_fresh(self.z_g.shape[0], tuple(self.z_g.shape[1:]), cfg, generator, x0.device, x0.dtype,
                                t.dtype)
        self.ones = torch.ones(self.z_g.shape[0], device=noise.device, dtype=t.dtype)
        x_b, z_b = x0[base_rows], noise[base_rows]
        self.t_b, self.c_b, self.m_b = t[base_rows], context[base_rows], _rows(context_mask, base_rows)
        self.x_t = interpolate(x_b, z_b, self.t_b)
        self.base_target = velocity_target(x_b, z_b)
        self.num_rounds = (1 if self.dm_on or self.fake_on else 0) + (1 if self.dm_on else 0)
        self.x_g = self.g = None

    def _one_step(self) -> ModelQuery:
        return ModelQuery(self.z_g, self.ones, self.c_g, self.m_g, t_target=torch.zeros_like(self.ones))

    def nograd_queries(self, round_index):
        if round_index == 0 and self.num_rounds > 0:
            return [self._one_step()]
        if round_index == 1 and self.dm_on:
            y = interpolate(self.x_g, self.fresh.z_dm, self.fresh.t_dm)
            return [ModelQuery(y, self.fresh.t_dm, self.c_g, self.m_g, fake_condition=True),
                    ModelQuery(y, self.fresh.t_dm, self.c_g, self.m_g, teacher=self.teacher)]
        raise IndexError(round_index)

    def receive(self, round_index, outputs):
        if round_index == 0:
            self.x_g = (self.z_g - outputs[0]).detach()
        else:
            self.g = dm_direction_from_velocities(outputs[0], outputs[1], self.cfg)

    def train_queries(self):
        queries = [ModelQuery(self.x_t, self.t_b, self.c_b, self.m_b)]
        if self.dm_on:
            queries.append(self._one_step())
        if self.fake_on:
            x_t_fake = interpolate(self.x_g, self.fresh.z_fake, self.fresh.t_fake)
            queries.append(ModelQuery(x_t_fake, self.fresh.t_fake, self.c_g, self.m_g, fake_condition=True))
        return queries

    def loss(self, outputs):
        cfg = self.cfg
        outputs = list(outputs)
        l_base = per_sample_mse(outputs.pop(0), self.base_target).mean()
        zero = l_base.new_zeros(())
        l_dm = distribution_matching_loss(outputs.pop(0), self.g).mean() if self.dm_on else zero
        l_fake = (per_sample_mse(outputs.pop(0), velocity_target(self.x_g, self.fresh.z_fake)).mean()
                  if self.fake_on else zero)
        loss = cfg.w_base * l_base + cfg.w_fake * l_fake + cfg.w_dm * l_dm
        return {"loss": loss, "l_base": l_base, "l_fake": l_fake, "l_dm": l_dm}


def two_phase_apex(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   context_mask: Optional[torch.Tensor], cfg: APEXConfig, *,
                   generator: Optional[torch.Generator] = None, teacher: bool = False,
                   step: Optional[int] = None) -> TwoPhaseObjective:
    """apex_loss's arguments (``teacher`` a bool: whether one answers the real DM query) ->
    the objective of this micro-batch as a TwoPhaseObjective."""
    if not isinstance(cfg, APEXConfig):
        raise ValueError(f"two_phase_apex: cfg must be an APEXConfig, got {type(cfg).__name__}")
    if cfg.variant == "paper":
        return PaperTwoPhase(x0, noise, t, context, context_mask, cfg)
    return ReleasedTwoPhase(x0, noise, t, context, context_mask, cfg, generator=generator, teacher=teacher,
                            step=step)


def run_two_phase(model: Callable, objective: TwoPhaseObjective,
                  teacher: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """The two phases in one process (the reference the pipeline executor is tested against):
    each round's queries as one no-grad batched call per answering model, then one batched
    training call."""
    for r in range(objective.num_rounds):
        queries = objective.nograd_queries(r)
        outputs: list = [None] * len(queries)
        with torch.no_grad():
            for use_teacher in (False, True):
                idx = [i for i, q in enumerate(queries) if q.teacher == use_teacher]
                if not idx:
                    continue
                answering = teacher if use_teacher else model
                if answering is None:
                    raise ValueError("a no-grad query asks for the teacher, but no teacher was given")
                mine = [queries[i] for i in idx]
                for i, out in zip(idx, split_output(answer_query(answering, batch_queries(mine)), mine)):
                    outputs[i] = out
        objective.receive(r, outputs)
    queries = objective.train_queries()
    return objective.loss(split_output(answer_query(model, batch_queries(queries)), queries))
