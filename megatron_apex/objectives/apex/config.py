"""APEX's settings: the variant, the condition shift's coefficients and each term's weight and
options, checked when an APEXConfig is made so a bad value fails before any model runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_apex.objectives.flow import WEIGHTINGS

VARIANTS = ("paper", "released")
FAKE_GRADS = ("detach", "through")
LOSSES = ("mse", "pseudo_huber")

# Named bundles of APEXConfig values; a preset fills the fields a caller did not set itself.
# "release": the combination of the authors' released training code (docs/apex_method.md has the
# table of each value against the release's files). Its CFG-enhanced target (cfg_scale) is the
# release configuration's enhanced_ratio; dm_clamp and w_dm are the release's dist_match clamp
# and dist_match_cof.
APEX_PRESETS = {
    "release": dict(variant="released", fake_time_flag=True, loss="pseudo_huber", huber_c=1e-3, tan_weight=True,
                    w_dm=0.5, dm_clamp=1.0, cfg_scale=0.8, any_step=True, any_step_order=2),
}


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
                 launcher's default: 1.0 with the clamp).
      dm_clamp:  g is clamped to [-dm_clamp, dm_clamp] (release: 1.0); None = no clamp.
      dm_normalize: divide g per sample by its RMS over the non-batch elements (applied
                 before the clamp; set dm_clamp=None for normalisation alone).
      dm_warmup_steps: the DM term is held off while step < dm_warmup_steps, so the fake
                 branch first adapts to c_fake (the launcher's default: 80); needs
                 apex_loss's ``step``.
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
      fake_time_flag: every fake-branch query (the fake flow on generated samples, the fake
                 velocity of the DM direction) runs at (t, tt) = (-t, -t) besides
                 fake_condition, as the release flags them: both time embedders see a negative
                 time and the target-time term is zero. Off = (t, tt) = (t, t).
      loss:      per-sample loss of every term: "mse", or "pseudo_huber" (the release's Barron
                 loss with alpha = 1): mse * w / huber_c with the detached weight
                 w = (mse / (huber_c^2 + 1e-8) + 1)^(-1/2), so every sample's gradient has
                 about the same norm (release_options.pseudo_huber).
      huber_c:   c of the pseudo-Huber loss (release: 1e-3); only with loss="pseudo_huber".
      tan_weight: the base rows' per-sample loss is weighted by
                 tan((1 - (|t| - |tt|)) * pi / 2.5) + 1 at the row's (t, tt) (the release's
                 weighting; fake-flow and DM rows keep weight 1). Our base rows are plain
                 velocity queries (tt = t), so the weight is the constant tan(0.4 pi) + 1
                 ~ 4.078 there: the same as w_base * 4.078; the consistency term's jump
                 (tt = 0) gets tan((1 - t) * 0.4 pi) + 1. Under any_step each base row
                 gets the weight of its own (t, tt): 1 for the e2e rows (1, 0).
      any_step:  the base rows train the any-step flow map as the release does (any_step.py):
                 a third at (t, tt) = (1, 0) from pure noise, a third with tt just below t,
                 a third with tt anywhere in [0, t] (under three base rows, each row draws its
                 group), each on its RCGM consistency target (a
                 step of consistency_step along the row's velocity target, then the model's
                 own no-grad jump to tt in any_step_order segments; the residual clamped to
                 consistency_clamp). Off = velocity queries (tt = t). Replaces the
                 one-jump stand-in w_consistency (use one of the two).
      any_step_order: the number of segments of that no-grad jump (release: 2), >= 1.
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
    fake_time_flag: bool = False
    loss: str = "mse"
    huber_c: float = 1e-3
    tan_weight: bool = False
    any_step: bool = False
    any_step_order: int = 2

    @classmethod
    def preset(cls, name: str, **fields) -> "APEXConfig":
        """The preset ``name`` (APEX_PRESETS), with ``fields`` taking precedence."""
        return cls(**{**preset_fields(name), **fields})

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
        for name in ("fuse_forwards", "fake_time_flag", "tan_weight", "any_step"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")
        if self.loss not in LOSSES:
            fail("loss", f"must be one of {LOSSES}")
        if number("huber_c") <= 0:
            fail("huber_c", "must be > 0")
        if self.loss != "pseudo_huber" and self.huber_c != APEXConfig.huber_c:
            fail("huber_c", "only acts with loss='pseudo_huber'")
        if self.loss == "pseudo_huber" and self.dm_normalize:
            fail("dm_normalize", "and loss='pseudo_huber' both normalise the DM gradient per sample; use one")
        if isinstance(self.any_step_order, bool) or not isinstance(self.any_step_order, int) \
                or self.any_step_order < 1:
            fail("any_step_order", "must be an integer >= 1")
        if self.any_step and self.w_consistency > 0:
            fail("w_consistency", "is the one-jump stand-in for any_step; with any_step=True leave it at 0")
        if self.variant == "paper":
            for name, off in (("cfg_scale", 0.0), ("w_consistency", 0.0), ("batch_split", None),
                              ("fake_time_flag", False), ("loss", "mse"), ("tan_weight", False),
                              ("any_step", False), ("any_step_order", 2)):
                if getattr(self, name) != off:
                    fail(name, "only acts in variant 'released'; leave it at its default for 'paper'")


def preset_fields(name: str) -> dict:
    """The APEXConfig values of the preset ``name``; a one-line error naming the presets."""
    if name not in APEX_PRESETS:
        raise ValueError(f"APEX preset {name!r}: unknown; choose one of {tuple(APEX_PRESETS)}")
    return dict(APEX_PRESETS[name])
