"""Variant "released": APEX as the authors' released code runs it (docs/apex_method.md).

The model makes one-step samples x_g = z - F(z, 1, c, tt=0); the shifted model learns the flow
of those samples (the paper's fake flow, Eq. 12, at fresh times and noise), and the difference
between the shifted and the real velocity at a noised x_g is handed back to the one-step
output as its gradient (distribution matching). A flow-matching loss on data keeps the real
branch; optional: a CFG-enhanced data target, a flow-map self-consistency term, a split of the
batch between the generated and the data terms.

The per-batch setup (released_batch), the queries (``*_query``) and the terms (released_terms)
are written once here; released_apex_loss runs them directly and the two-phase form
(two_phase.ReleasedTwoPhase) runs the same ones in pipeline passes.

Reduction everywhere: squared norms averaged over the non-batch elements, then the batch.
A term whose weight is 0 (or that is held off) is not evaluated and is reported as 0.
The release's own flag of the fake queries, its pseudo-Huber loss and its tan weighting of the
base rows are options (release_options.py), off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_apex.objectives.apex.any_step import (displacement_by_segments, draw_target_times, rcgm_residual,
                                                    rcgm_target)
from megatron_apex.objectives.apex.config import APEXConfig
from megatron_apex.objectives.apex.paper import fake_flow_query, fake_flow_term
from megatron_apex.objectives.apex.queries import ModelQuery, answer_query, batch_queries, call_model, split_output
from megatron_apex.objectives.apex.release_options import flag_fake_time, per_sample_loss, tan_weight, weighted_mean
from megatron_apex.objectives.flow import (WEIGHT_T_EPS, draw_device, expand_time, interpolate, per_sample_mse,
                                          velocity_target)

# ---- the batch: rows, fresh draws, which terms are on -------------------------------------


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
    where = draw_device(generator)
    x_draw = torch.promote_types(dtype, torch.float32)
    t_draw = torch.promote_types(t_dtype, torch.float32)
    span = cfg.fresh_t_max - cfg.fresh_t_min

    def times():
        u = torch.rand(n, generator=generator, device=where, dtype=t_draw)
        return (cfg.fresh_t_min + span * u).to(device=device, dtype=t_dtype)

    def noise():
        z = torch.randn((n, *sample_shape), generator=generator, device=where, dtype=x_draw)
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


def dm_held_off(cfg: APEXConfig, step: Optional[int]) -> bool:
    """Whether the DM term is still held off at ``step`` (APEXConfig.dm_warmup_steps)."""
    if cfg.dm_warmup_steps == 0:
        return False
    if step is None:
        raise ValueError(f"APEXConfig.dm_warmup_steps={cfg.dm_warmup_steps} needs apex_loss's step kwarg")
    return step < cfg.dm_warmup_steps


def _rows(x: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if x is None else x[rows]


@dataclass
class ReleasedBatch:
    """One micro-batch as the released variant uses it: the generator rows (their noise is the
    one-step generator's z) with their fresh draws, the base rows on their data trajectory,
    and which terms are on this step."""

    z_g: torch.Tensor
    c_g: torch.Tensor
    m_g: Optional[torch.Tensor]
    fresh: FreshDraws
    x_t: torch.Tensor
    t_b: torch.Tensor
    c_b: torch.Tensor
    m_b: Optional[torch.Tensor]
    base_target: torch.Tensor
    base_rows: slice
    batch_size: int
    fake_on: bool
    dm_on: bool
    fake_time_flag: bool = False
    tt_b: Optional[torch.Tensor] = None  # the base rows' target times under any_step (None: tt = t)


def released_batch(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   context_mask: Optional[torch.Tensor], cfg: APEXConfig, generator: Optional[torch.Generator],
                   step: Optional[int]) -> ReleasedBatch:
    """Split the batch (APEXConfig.batch_split) and draw the generator rows' fresh t', z', t'', z''
    (then, under any_step, the base rows' target times: any_step.draw_target_times)."""
    dm_on = cfg.w_dm > 0 and not dm_held_off(cfg, step)
    gen_rows, base_rows = split_rows(x0.shape[0], cfg.batch_split)
    z_g = noise[gen_rows]
    fresh = draw_fresh(z_g.shape[0], tuple(z_g.shape[1:]), cfg, generator, x0.device, x0.dtype, t.dtype)
    x_b, z_b, t_b = x0[base_rows], noise[base_rows], t[base_rows]
    tt_b = None
    if cfg.any_step:
        t_b, tt_b = draw_target_times(t_b, generator)
    return ReleasedBatch(z_g, context[gen_rows], _rows(context_mask, gen_rows), fresh, interpolate(x_b, z_b, t_b),
                         t_b, context[base_rows], _rows(context_mask, base_rows), velocity_target(x_b, z_b), base_rows,
                         x0.shape[0], fake_on=cfg.w_fake > 0, dm_on=dm_on, fake_time_flag=cfg.fake_time_flag,
                         tt_b=tt_b)


# ---- the queries ---------------------------------------------------------------------------

def base_query(b: ReleasedBatch) -> ModelQuery:
    """Point 1: F(x_t, t, c) on the base rows' data trajectory (under any_step the jump to tt_b)."""
    return ModelQuery(b.x_t, b.t_b, b.c_b, b.m_b, t_target=b.tt_b)


def one_step_query(noise: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor],
                   t_dtype: torch.dtype) -> ModelQuery:
    """Point 2: the one-step jump F(z, 1, c, tt=0)."""
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=t_dtype)
    return ModelQuery(noise, ones, context, context_mask, t_target=torch.zeros_like(ones))


def generated_fake_flow_query(x_g: torch.Tensor, b: ReleasedBatch) -> ModelQuery:
    """Point 3: the paper's fake flow query (Eq. 12) from sg(x_g), at the fresh t', z'
    (flagged at (-t', -t') under fake_time_flag)."""
    return flag_fake_time(fake_flow_query(x_g, b.fresh.z_fake, b.fresh.t_fake, b.c_g, b.m_g), b.fake_time_flag)


def dm_queries(x_g: torch.Tensor, b: ReleasedBatch, teacher: bool) -> List[ModelQuery]:
    """Point 4: [F(y, t'', c_fake), F_real(y, t'', c)] at ``y = t'' z'' + (1-t'') sg(x_g)``
    (the fake one flagged at (-t'', -t'') under fake_time_flag); ``teacher``: whether the
    teacher answers the real one."""
    y = interpolate(x_g.detach(), b.fresh.z_dm, b.fresh.t_dm)
    fake = ModelQuery(y, b.fresh.t_dm, b.c_g, b.m_g, fake_condition=True)
    return [flag_fake_time(fake, b.fake_time_flag), ModelQuery(y, b.fresh.t_dm, b.c_g, b.m_g, teacher=teacher)]


# ---- the terms -----------------------------------------------------------------------------

@torch.no_grad()
def dm_direction_from_velocities(v_fake: torch.Tensor, v_real: torch.Tensor, cfg: APEXConfig) -> torch.Tensor:
    """Point 4's ``g = v_fake - v_real`` (float32 or wider), normalised and/or clamped per cfg.

    Why this sign moves x_g toward the data: for the OT path v(y) = (y - E[x|y]) / t, so
    v_fake - v_real = (E_real[x|y] - E_fake[x|y]) / t points from the generated toward the
    real distribution; the loss puts gradient +g on F_g, and x_g = z - F_g, so a descent step
    moves x_g by +eta*g."""
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


def base_row_weight(b: ReleasedBatch, cfg: APEXConfig) -> Optional[torch.Tensor]:
    """The base rows' per-sample weight under tan_weight, at the (t, tt) the base query asks
    (tt = t, the velocity query: a constant); None when off."""
    if not cfg.tan_weight:
        return None
    query = base_query(b)
    return tan_weight(query.t, query.t_target)


def any_step_target(f_base: torch.Tensor, displacement: torch.Tensor, velocity: torch.Tensor, b: ReleasedBatch,
                    cfg: APEXConfig) -> torch.Tensor:
    """Under any_step, the base rows' RCGM target sg(F) - R (any_step.py) from the answer to the
    base query, the segments' displacement and the rows' velocity target."""
    return rcgm_target(f_base, rcgm_residual(f_base, displacement, velocity, b.t_b, b.tt_b, cfg.consistency_step,
                                             cfg.consistency_clamp))


def released_terms(cfg: APEXConfig, v_base: torch.Tensor, base_target: torch.Tensor, *,
                   v_fake: Optional[torch.Tensor], x_g: Optional[torch.Tensor], z_fake: torch.Tensor,
                   f_g: Optional[torch.Tensor], g: Optional[torch.Tensor],
                   base_weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """``loss``, ``l_base``, ``l_fake``, ``l_dm`` from the answers: the base query's ``v_base``,
    the fake flow query's ``v_fake`` (None = term off), the one-step output ``f_g`` with its DM
    direction ``g`` (None = term off); each term's per-sample loss as cfg.loss says, the base
    rows weighted by ``base_weight`` (base_row_weight; None = 1)."""
    l_base = weighted_mean(per_sample_loss(per_sample_mse(v_base, base_target), cfg), base_weight)
    zero = l_base.new_zeros(())
    l_fake = zero if v_fake is None else per_sample_loss(fake_flow_term(v_fake, x_g, z_fake), cfg).mean()
    l_dm = zero if g is None else per_sample_loss(distribution_matching_loss(f_g, g), cfg).mean()
    loss = cfg.w_base * l_base + cfg.w_fake * l_fake + cfg.w_dm * l_dm
    return {"loss": loss, "l_base": l_base, "l_fake": l_fake, "l_dm": l_dm}


# ---- run directly (with the direct form's options) -----------------------------------------

def one_step_generation(model: Callable, noise: torch.Tensor, context: torch.Tensor,
                        context_mask: Optional[torch.Tensor], t_dtype: torch.dtype = torch.float32
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Point 2: ``F_g = F(z, 1, c, tt=0)``, ``x_g = z - F_g`` (gradient kept on F_g)."""
    f_g = answer_query(model, one_step_query(noise, context, context_mask, t_dtype))
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


@torch.no_grad()
def distribution_matching_direction(model: Callable, teacher: Optional[Callable], x_g: torch.Tensor,
                                    b: ReleasedBatch, cfg: APEXConfig) -> torch.Tensor:
    """Point 4: ``g = sg(F(y, t'', c_fake) - F_real(y, t'', c))`` (dm_direction_from_velocities).
    F_real is ``teacher`` (e.g. a frozen copy) or, when None, the model itself; then, with
    fuse_forwards, both queries run as one batched call."""
    queries = dm_queries(x_g, b, teacher=False)
    if teacher is None and cfg.fuse_forwards:
        v_fake, v_real = split_output(answer_query(model, batch_queries(queries)), queries)
    else:
        v_fake = answer_query(model, queries[0])
        v_real = answer_query(teacher if teacher is not None else model, queries[1])
    return dm_direction_from_velocities(v_fake, v_real, cfg)


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


def _fit_rows(x: Optional[torch.Tensor], n: int, rows: slice, batch_size: int, name: str) -> Optional[torch.Tensor]:
    """A per-sample kwarg of batch 1 (broadcast) or of the full batch (take ``rows``)."""
    if x is None:
        return None
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    if x.shape[0] != batch_size:
        raise ValueError(f"{name} must have batch size 1 or {batch_size}, got {x.shape[0]}")
    return x[rows]


def _base_target(model: Callable, teacher: Optional[Callable], b: ReleasedBatch, cfg: APEXConfig,
                 uncond_context: Optional[torch.Tensor], uncond_context_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Point 1's target: z - x, CFG-enhanced (on the teacher, else the model) when cfg_scale > 0;
    under any_step the rows at t = 1 (the e2e jumps) keep z - x, as the release's do."""
    if cfg.cfg_scale == 0:
        return b.base_target
    n_b = b.x_t.shape[0]
    uc = _fit_rows(uncond_context, n_b, b.base_rows, b.batch_size, "uncond_context")
    um = _fit_rows(uncond_context_mask, n_b, b.base_rows, b.batch_size, "uncond_context_mask")
    enhanced = cfg_enhanced_target(teacher if teacher is not None else model, b.base_target, b.x_t, b.t_b, b.c_b,
                                   b.m_b, uc, um, cfg.cfg_scale)
    if b.tt_b is None:
        return enhanced
    return torch.where(expand_time(b.t_b < 1, enhanced).bool(), enhanced, b.base_target.to(enhanced.dtype))


def _base_and_fake_velocities(model: Callable, b: ReleasedBatch, x_g: torch.Tensor,
                              cfg: APEXConfig) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The answers to the base query and (fake flow on) the fake flow query; with
    fuse_forwards one batched call with a per-row fake_condition."""
    base = base_query(b)
    if not b.fake_on:
        return answer_query(model, base), None
    fake = generated_fake_flow_query(x_g, b)
    if not cfg.fuse_forwards:
        return answer_query(model, base), answer_query(model, fake)
    v = answer_query(model, batch_queries([base, fake]))
    # slices, not split_output: the direct form's gradients are pinned to this backward graph
    return v[:base.rows], v[base.rows:]


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
    b = released_batch(x0, noise, t, context, context_mask, cfg, generator, step)

    # the one-step output's graph is only needed by the DM term; every later use is sg(x_g)
    with torch.set_grad_enabled(b.dm_on and torch.is_grad_enabled()):
        f_g, x_g = one_step_generation(model, b.z_g, b.c_g, b.m_g, t.dtype)
    x_g = x_g.detach()

    base_target = _base_target(model, teacher, b, cfg, uncond_context, uncond_context_mask)
    v_base, v_fake = _base_and_fake_velocities(model, b, x_g, cfg)
    if b.tt_b is not None:
        displacement = displacement_by_segments(model, b.x_t, b.t_b, b.tt_b, base_target, b.c_b, b.m_b,
                                                cfg.consistency_step, cfg.any_step_order)
        base_target = any_step_target(v_base, displacement, base_target, b, cfg)
    g = distribution_matching_direction(model, teacher, x_g, b, cfg) if b.dm_on else None
    terms = released_terms(cfg, v_base, base_target, v_fake=v_fake, x_g=x_g, z_fake=b.fresh.z_fake, f_g=f_g, g=g,
                           base_weight=base_row_weight(b, cfg))

    if cfg.w_consistency > 0:
        consistency = flow_map_consistency_loss(model, b.x_t, b.t_b, v_base, b.c_b, b.m_b, cfg.consistency_step,
                                                cfg.consistency_clamp)
        # the jump's row is (t, tt = 0)
        weight = tan_weight(b.t_b, torch.zeros_like(b.t_b)) if cfg.tan_weight else None
        terms["l_consistency"] = weighted_mean(per_sample_loss(consistency, cfg), weight)
        terms["loss"] = terms["loss"] + cfg.w_consistency * terms["l_consistency"]
    return terms
