"""Variant "paper": APEX as the paper's equations write it (Eqs. 11, 12, 14, 20-25).

The model's one-jump endpoint x_fake (Eq. 11) is put back on a trajectory and the model, under
the shifted condition, learns its flow (L_fake, Eq. 12); the shifted model's velocity at the
real point (v_fake, Eq. 14) pulls the real branch's endpoint target toward the model's own
outputs (L_mix, Eqs. 23-24). The queries (``*_query``) and the terms (``*_term``, paper_terms)
are written once here; paper_apex_loss runs them directly and the two-phase form
(two_phase.PaperTwoPhase) runs the same ones in pipeline passes.

Reduction everywhere: squared norms averaged over the non-batch elements, then the batch.
A term whose weight is 0 is not evaluated and is reported as 0.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron_apex.objectives.apex.config import APEXConfig
from megatron_apex.objectives.apex.queries import ModelQuery, answer_query
from megatron_apex.objectives.flow import endpoint, flow_matching_error, interpolate, mix_weight, per_sample_mse


def fake_sample(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``x_fake = x_t - t*F(x_t, t, c)``, the model's own one-jump endpoint."""
    return endpoint(velocity, x_t, t)


def fake_trajectory(x_fake: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t_fake = t*z + (1-t)*x_fake`` (same z, same t as the real point)."""
    return interpolate(x_fake, noise, t)


# ---- the queries ---------------------------------------------------------------------------

def real_point_query(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     context_mask: Optional[torch.Tensor], fake_condition: bool = False) -> ModelQuery:
    """F(x_t, t, c) (the real branch), or with ``fake_condition`` F(x_t, t, c_fake) (v_fake, Eq. 14)."""
    return ModelQuery(x_t, t, context, context_mask, fake_condition=fake_condition)


def fake_flow_query(x_fake: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    context_mask: Optional[torch.Tensor]) -> ModelQuery:
    """Eq. 12's query: F(x_t_fake, t, c_fake) on the fake trajectory from ``x_fake``."""
    return ModelQuery(fake_trajectory(x_fake, noise, t), t, context, context_mask, fake_condition=True)


# ---- the terms -----------------------------------------------------------------------------

def fake_flow_term(velocity: torch.Tensor, x_fake: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 12, per sample (B,): ``||F(x_t_fake, t, c_fake) - (z - x_fake)||^2``, unweighted,
    given the fake flow query's answer. Gradients through ``x_fake`` are whatever the caller
    left on it (detach or not)."""
    return flow_matching_error(velocity, x_fake, noise)


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


def mix_term(velocity: torch.Tensor, v_fake: Optional[torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor, cfg: APEXConfig) -> torch.Tensor:
    """L_mix (Eqs. 23-24, batch mean) from the real branch's velocity and v_fake."""
    target = mixed_target(x0, v_fake, x_t, t, cfg.lam)
    return mixed_consistency_loss(velocity, x_t, t, target, cfg.weighting).mean()


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


def paper_terms(l_fake: Optional[torch.Tensor], l_mix: torch.Tensor, cfg: APEXConfig) -> Dict[str, torch.Tensor]:
    """The variant's logged terms: ``loss`` (Eq. 25), ``l_fake`` (0 when off), ``l_mix``."""
    if l_fake is None:
        l_fake = l_mix.new_zeros(())
    return {"loss": apex_total(l_fake, l_mix, cfg.lambda_p, cfg.lambda_e), "l_fake": l_fake, "l_mix": l_mix}


def fake_branch_on(cfg: APEXConfig) -> bool:
    """Whether L_fake is evaluated (it needs x_fake and the fake flow query)."""
    return cfg.lambda_p > 0


def v_fake_needed(cfg: APEXConfig) -> bool:
    """Whether the mixed target uses v_fake (at lam = 0 it is the data endpoint alone)."""
    return cfg.lam > 0


# ---- run directly --------------------------------------------------------------------------

def fake_flow_loss(model: Callable, x_fake: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 12, per sample (B,): the fake flow query answered by ``model``, then its term."""
    velocity = answer_query(model, fake_flow_query(x_fake, noise, t, context, context_mask))
    return fake_flow_term(velocity, x_fake, noise)


@torch.no_grad()
def fake_velocity_reference(model: Callable, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                            context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 14: ``v_fake = sg(F(x_t, t, c_fake))`` at the REAL trajectory point, no gradient."""
    return answer_query(model, real_point_query(x_t, t, context, context_mask, fake_condition=True)).detach()


def paper_apex_loss(model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    context: torch.Tensor, context_mask: Optional[torch.Tensor],
                    cfg: APEXConfig) -> Dict[str, torch.Tensor]:
    """Variant "paper": returns ``loss``, ``l_fake`` (Eq. 12), ``l_mix`` (Eq. 24).

    One real-branch forward serves both L_mix and x_fake, so with fake_grad="through" the
    gradient reaches the model through x_fake as well."""
    x_t = interpolate(x0, noise, t)
    velocity = answer_query(model, real_point_query(x_t, t, context, context_mask))  # F(x_t, t, c)

    v_fake = fake_velocity_reference(model, x_t, t, context, context_mask) if v_fake_needed(cfg) else None
    l_mix = mix_term(velocity, v_fake, x0, x_t, t, cfg)

    l_fake = None
    if fake_branch_on(cfg):
        x_fake = fake_sample(velocity, x_t, t)
        if cfg.fake_grad == "detach":
            x_fake = x_fake.detach()
        l_fake = fake_flow_loss(model, x_fake, noise, t, context, context_mask).mean()
    return paper_terms(l_fake, l_mix, cfg)
