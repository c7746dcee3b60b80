"""APEXConfig.any_step (with any_step_order): the released variant's base rows trained as the authors'
release trains its flow map (apex/any_step.py). Each piece is checked against a reference written
here from the release's own formulas (APEX.prepare_inputs' row groups, APEX.multi_fwd and
APEX.get_rcgm_target in their cof_l / cof_r form, the tan weighting), the direct form against the
two-phase form, the refusals, and the option off against the draws it must not touch."""

import math
import re

import pytest
import torch
from torch import nn

from _toy_models import make_batch
from megatron_apex.objectives.apex import APEXConfig, apex_loss, run_two_phase, two_phase_apex
from megatron_apex.objectives.apex import any_step
from megatron_apex.objectives.apex.released import _base_target, base_query, draw_fresh, released_batch

SEED = 5
SHAPE = (2, 3, 3)
CTX_DIM = 6


# ---- a model with a real any-step input --------------------------------------------------------

class AnyStepToy(nn.Module):
    """out = W x + a t + b tt + s * P(pooled context), s = -1 on fake_condition rows: every input
    of the model contract moves the output, the target time tt among them."""

    def __init__(self, seed=0, scale=0.4):
        super().__init__()
        numel = math.prod(SHAPE)
        gen = torch.Generator().manual_seed(seed)

        def param(*shape):
            return nn.Parameter(scale * torch.randn(*shape, generator=gen, dtype=torch.float64))

        self.w, self.bias = param(numel, numel), param(numel)
        self.a, self.b = param(numel), param(numel)
        self.p = param(numel, CTX_DIM)

    def forward(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        tt = t if t_target is None else t_target
        if context_mask is None:
            pooled = context.mean(dim=1)
        else:
            m = context_mask.to(context.dtype).unsqueeze(-1)
            pooled = (context * m).sum(dim=1) / m.sum(dim=1)
        fake = fake_condition if isinstance(fake_condition, torch.Tensor) else \
            torch.full((x_t.shape[0],), bool(fake_condition))
        sign = 1.0 - 2.0 * fake.to(x_t.dtype)[:, None]
        out = x_t.flatten(1) @ self.w.T + self.bias + t[:, None] * self.a + tt[:, None] * self.b \
            + sign * (pooled @ self.p.T)
        return out.view_as(x_t)


class GradOutputs(nn.Module):
    """Keeps every output that carries a gradient, with its .grad retained."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.outputs = inner, []

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if out.requires_grad:
            out.retain_grad()
            self.outputs.append(out)
        return out


def bt(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def batch(n=6, seed=0):
    return make_batch(batch=n, sample_shape=SHAPE, ctx_dim=CTX_DIM, seed=seed)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the release's rules, re-typed ----------------------------------------------------------------

def release_lens(n):
    """APEX.prepare_inputs' group lengths with our three groups (its fourth, "adv", is our fake rows)."""
    vals = [1, 1, 1]
    lens = [int(round(n * v / (sum(vals) or 1))) for v in vals]
    lens[-1] = n - sum(lens[:-1])
    return lens


# the same rule, tabulated by hand (n = 1..9)
HAND_LENS = {1: (0, 0, 1), 2: (1, 1, 0), 3: (1, 1, 1), 4: (1, 1, 2), 5: (2, 2, 1), 6: (2, 2, 2), 7: (2, 2, 3),
             8: (3, 3, 2), 9: (3, 3, 3)}


def hand_groups(n, seed_generator=None):
    """Each row's group name: consecutive thirds (HAND_LENS) from three rows on; under three, one
    uniform draw of {0, 1, 2} per row from the generator, after the rows' u."""
    if n >= 3:
        n_e2e, n_mul, n_any = HAND_LENS[n]
        return ["e2e"] * n_e2e + ["mul"] * n_mul + ["any"] * n_any
    return [("e2e", "mul", "any")[int(k)] for k in torch.randint(3, (n,), generator=seed_generator)]


def hand_target_times(t, u, groups=None):
    """(t, tt) row by row: e2e (1, 0), mul tt = t - u t 0.05, any tt = t - u t."""
    groups = hand_groups(len(t)) if groups is None else groups
    t_out, tt_out = [], []
    for group, ti, ui in zip(groups, t.tolist(), u.tolist()):
        if group == "e2e":
            t_out.append(1.0), tt_out.append(0.0)
        elif group == "mul":
            t_out.append(ti), tt_out.append(ti - ui * ti * 0.05)
        else:
            t_out.append(ti), tt_out.append(ti - ui * ti)
    return torch.tensor(t_out, dtype=t.dtype), torch.tensor(tt_out, dtype=t.dtype)


def replayed_u(n_gen, n_base, seed, dtype=torch.float64):
    """u of the base rows: drawn after draw_fresh's u' (n,), z' (n, ...), u'' (n,), z'' (n, ...)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        torch.rand(n_gen, generator=g, dtype=dtype)
        torch.randn((n_gen, *SHAPE), generator=g, dtype=dtype)
    return torch.rand(n_base, generator=g, dtype=dtype)


def release_forward(model, x_t, t, tt, c, m):
    """APEX.forward on the release's OT path (integ_st = 1, dent = -1): x_hat, z_hat, F."""
    f = model(x_t, t, c, context_mask=m, t_target=tt)
    x_hat = (f * bt(t, f) - x_t * 1) / -1
    z_hat = (x_t * -1 - f * (1 - bt(t, f))) / -1
    return x_hat, z_hat, f


def release_multi_fwd(model, x_t, t, tt, c, m, n):
    pred = 0
    ts = [t * (1 - i / n) + tt * (i / n) for i in range(n + 1)]
    for t_c, t_n in zip(ts[:-1], ts[1:]):
        hx, hz, f_c = release_forward(model, x_t, t_c, t_n, c, m)
        x_t = bt(t_n, hz) * hz + (1 - bt(t_n, hx)) * hx
        pred = pred + f_c * bt(t_c - t_n, f_c)
    return pred


@torch.no_grad()
def release_rcgm_target(model, f_th_t, target, x_t, t, tt, c, m, n, clamp=1.0):
    """APEX.get_rcgm_target (its step 0.01 and clamp 1; clamp=None: the same without the clamp)."""
    t_m = (t - 0.01).clamp_min(tt)
    x_t = x_t - target * 0.01
    ft_tar = release_multi_fwd(model, x_t, t_m, tt, c, m, n)
    mask = t < (tt + 0.01)
    cof_l = torch.where(mask, torch.ones_like(t), 100 * (t - tt))
    cof_r = torch.where(mask, 1 / (t - tt), torch.ones_like(t) * 100)
    ft_tar = (f_th_t * bt(cof_l, f_th_t) - ft_tar * bt(cof_r, f_th_t)) - target
    if clamp is not None:
        ft_tar = ft_tar.clamp(min=-clamp, max=clamp)
    return f_th_t.data - ft_tar


def release_weight(t, tt):
    return torch.tensor([math.tan((1 - (abs(a) - abs(b))) * math.pi / 2.5) + 1 for a, b in zip(t.tolist(),
                                                                                                   tt.tolist())],
                        dtype=t.dtype)


def hand_base_rows(model, x0, z, t, c, m, cfg, seed, uncond=None):
    """The base rows as the release builds and targets them (no batch_split): t, tt, the
    any-step output F (with its graph), the residual R = F - target and the per-row weight."""
    n = x0.shape[0]
    tb, ttb = hand_target_times(t, replayed_u(n, n, seed))
    x_t = bt(tb, z) * z + (1 - bt(tb, x0)) * x0
    v = z - x0
    if cfg.cfg_scale > 0:
        with torch.no_grad():  # the release enhances only rows with t in (0, 1)
            gain = model(x_t, tb, c, context_mask=m) - model(x_t, tb, uncond.expand(n, *uncond.shape[1:]))
        v = torch.where(bt((tb > 0) & (tb < 1), v), v + cfg.cfg_scale * gain, v)
    f = model(x_t, tb, c, context_mask=m, t_target=ttb)
    target = release_rcgm_target(model, f, v, x_t, tb, ttb, c, m, cfg.any_step_order, cfg.consistency_clamp)
    residual = f.detach() - target
    weight = release_weight(tb, ttb) if cfg.tan_weight else torch.ones_like(tb)
    return dict(t=tb, tt=ttb, f=f, v=v, residual=residual, weight=weight)


def released(**fields):
    return APEXConfig(variant="released", any_step=True, **fields)


def base_only(**fields):
    """l_base alone: no fake flow, no DM, MSE."""
    return released(w_fake=0.0, w_dm=0.0, **fields)


# ---- 1. the row groups and their target times -----------------------------------------------------

@pytest.mark.parametrize("n", range(1, 10))
def test_group_sizes_are_the_releases_lens(n):
    assert tuple(release_lens(n)) == HAND_LENS[n]
    assert any_step.group_sizes(n) == HAND_LENS[n]


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_draw_target_times_by_hand(n, dtype):
    t = torch.rand(n, generator=torch.Generator().manual_seed(100 + n), dtype=dtype) * 0.9 + 0.05
    got_t, got_tt = any_step.draw_target_times(t, torch.Generator().manual_seed(n))
    replay = torch.Generator().manual_seed(n)
    u = torch.rand(n, generator=replay, dtype=dtype)
    groups = hand_groups(n, replay)
    want_t, want_tt = hand_target_times(t, u, groups)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got_tt, want_tt, rtol=0, atol=tol)
    rows = {name: torch.tensor([g == name for g in groups], dtype=torch.bool) for name in ("e2e", "mul", "any")}
    e2e, mul, anywhere = rows["e2e"], rows["mul"], rows["any"]
    assert (got_t[e2e] == 1).all() and (got_tt[e2e] == 0).all()
    for rows in (mul, anywhere):
        assert torch.equal(got_t[rows], t[rows])
    gap = got_t[mul] - got_tt[mul]
    assert ((gap >= 0) & (gap <= 0.05 * got_t[mul])).all()
    assert ((got_tt[anywhere] >= 0) & (got_tt[anywhere] <= got_t[anywhere])).all()
    # the caller's t is left as it was (released_batch's t is the caller's batch)
    assert torch.equal(t, torch.rand(n, generator=torch.Generator().manual_seed(100 + n), dtype=dtype) * 0.9 + 0.05)


@pytest.mark.parametrize("n", [1, 2])
def test_a_micro_batch_under_three_rows_draws_every_group(n):
    """A micro-batch of 1 or 2 (a 20B model's) cannot hold the three consecutive groups; its rows
    draw theirs, so over many micro-batches each group gets about a third of the rows."""
    counts = {"e2e": 0, "mul": 0, "any": 0}
    draws = 600
    for seed in range(draws):
        t = torch.full((n,), 0.5, dtype=torch.float64)
        got_t, got_tt = any_step.draw_target_times(t, torch.Generator().manual_seed(seed))
        for ti, tti in zip(got_t.tolist(), got_tt.tolist()):
            if (ti, tti) == (1.0, 0.0):
                counts["e2e"] += 1
            elif ti - tti <= 0.05 * ti:
                counts["mul"] += 1  # (an "any" row with u <= 0.05 lands here too: ~5 % of a third)
            else:
                counts["any"] += 1
    total = draws * n
    for name, count in counts.items():
        assert abs(count / total - 1 / 3) < 0.06, counts


@pytest.mark.parametrize("batch_split", [None, 0.5])
def test_released_batch_draws_the_target_times_after_the_fresh_draws(batch_split):
    x0, z, t, c, m = batch(n=7)
    cfg = released(batch_split=batch_split)
    b = released_batch(x0, z, t, c, m, cfg, torch.Generator().manual_seed(SEED), None)
    n_gen = 7 if batch_split is None else 4  # round(0.5 * 7) = 4 generator rows, the last 3 the base rows
    base = slice(None) if batch_split is None else slice(n_gen, None)
    n_base = 7 - (0 if batch_split is None else n_gen)
    want_t, want_tt = hand_target_times(t[base], replayed_u(n_gen, n_base, SEED))
    torch.testing.assert_close(b.t_b, want_t, rtol=0, atol=0)
    torch.testing.assert_close(b.tt_b, want_tt, rtol=0, atol=1e-15)
    want_xt = bt(want_t, z) * z[base] + (1 - bt(want_t, z)) * x0[base]
    torch.testing.assert_close(b.x_t, want_xt, rtol=0, atol=1e-15)
    n_e2e = HAND_LENS[n_base][0]
    assert n_e2e > 0 and torch.equal(b.x_t[:n_e2e], z[base][:n_e2e])  # the e2e rows start from pure noise
    torch.testing.assert_close(b.base_target, z[base] - x0[base], rtol=0, atol=0)
    query = base_query(b)
    assert torch.equal(query.t, b.t_b) and torch.equal(query.t_target, b.tt_b)


# ---- 2. the RCGM target against the release's get_rcgm_target -------------------------------------

# (t, tt): the e2e jump, far from the diagonal, a gap just above the step, and gaps below it
# (where the release divides by t - tt)
ROWS = [(1.0, 0.0), (0.9, 0.1), (0.5, 0.45), (0.7, 0.68), (0.6, 0.595), (0.3, 0.2999), (0.02, 0.0)]


def rcgm_case(order, clamp, scale):
    model = AnyStepToy(seed=3, scale=scale)
    x0, z, _, c, m = batch(n=len(ROWS), seed=2)
    t = torch.tensor([r[0] for r in ROWS], dtype=torch.float64)
    tt = torch.tensor([r[1] for r in ROWS], dtype=torch.float64)
    x_t = bt(t, z) * z + (1 - bt(t, z)) * x0
    v = z - x0 + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(9), dtype=z.dtype)
    with torch.no_grad():
        f = model(x_t, t, c, context_mask=m, t_target=tt)
        d = any_step.displacement_by_segments(model, x_t, t, tt, v, c, m, 0.01, order)
        got = any_step.rcgm_target(f, any_step.rcgm_residual(f, d, v, t, tt, 0.01, clamp))
        raw = any_step.rcgm_residual(f, d, v, t, tt, 0.01, None)
    want = release_rcgm_target(model, f, v, x_t, t, tt, c, m, order, clamp)
    return got, want, raw, v


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("clamp, scale", [(None, 0.4), (1.0, 0.4), (1.0, 1.5)],
                         ids=["no-clamp", "clamp-mostly-idle", "clamp-active"])
def test_rcgm_target_is_the_releases(order, clamp, scale):
    got, want, raw, _ = rcgm_case(order, clamp, scale)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if clamp is not None and scale > 1:
        # the clamp has work to do, and not everywhere
        assert (raw.abs() > clamp).float().mean() > 0.1 and (raw.abs() < clamp).any()


def test_rcgm_target_depends_on_the_order_and_the_clamp():
    """So the comparisons above could fail: each order and the clamp change the target."""
    targets = [rcgm_case(order, None, 0.4)[0] for order in (1, 2, 3)]
    assert not torch.allclose(targets[0], targets[1]) and not torch.allclose(targets[1], targets[2])
    assert not torch.allclose(rcgm_case(2, 1.0, 1.5)[0], rcgm_case(2, None, 1.5)[0])


def test_rows_below_the_step_are_velocity_rows():
    """t - tt < d: the target is the velocity target itself (R = F - v), whatever the order."""
    below = [i for i, (a, b) in enumerate(ROWS) if a - b < 0.01]
    assert below
    for order in (1, 3):
        got, _, _, v = rcgm_case(order, None, 0.4)
        torch.testing.assert_close(got[below], v[below], rtol=0, atol=1e-12)


# ---- 3. the base term and its gradient ----------------------------------------------------------------

def test_l_base_is_the_mean_square_residual_and_its_gradient_is_2R_over_NB():
    cfg = base_only()
    model = GradOutputs(AnyStepToy(seed=1))
    x0, z, t, c, m = batch(n=9, seed=4)
    out = apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED))
    (f_base,) = model.outputs  # the base query is the only output with a gradient
    with torch.no_grad():
        hand = hand_base_rows(model.inner, x0, z, t, c, m, cfg, SEED)
    gap = hand["t"] - hand["tt"]
    assert ((gap > 0) & (gap < 0.01)).any() and (gap > 0.01).any()  # both kinds of row occur
    r = hand["residual"]
    torch.testing.assert_close(out["l_base"], r.pow(2).flatten(1).mean(1).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out["loss"], out["l_base"], rtol=0, atol=0)
    out["l_base"].backward()
    n, b = r[0].numel(), r.shape[0]
    torch.testing.assert_close(f_base.grad, 2 * r / (n * b), rtol=1e-9, atol=1e-13)


# ---- 4. the tan weight at each row's own (t, tt) ------------------------------------------------------

def test_tan_weight_uses_each_rows_t_and_tt():
    cfg = base_only(tan_weight=True)
    model = AnyStepToy(seed=1)
    x0, z, t, c, m = batch(n=9, seed=4)
    out = apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        hand = hand_base_rows(model, x0, z, t, c, m, cfg, SEED)
    w = hand["weight"]
    n_e2e = HAND_LENS[9][0]
    torch.testing.assert_close(w[:n_e2e], torch.ones(n_e2e, dtype=w.dtype), rtol=1e-12, atol=1e-12)
    assert w.max() - w.min() > 1  # the weight varies across the rows
    per_row = hand["residual"].pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["l_base"], (w * per_row).mean(), rtol=1e-10, atol=0)
    assert not torch.allclose(out["l_base"], per_row.mean() * w.mean())


# ---- 5. the direct and the two-phase forms agree -------------------------------------------------------

FORM_CASES = [dict(w_fake=0.0, w_dm=0.0), dict(w_dm=0.0), dict(), dict(w_dm=0.7, fake_time_flag=True),
              dict(loss="pseudo_huber"), dict(tan_weight=True), dict(batch_split=0.5),
              dict(fake_time_flag=True, loss="pseudo_huber", tan_weight=True, batch_split=0.4)]


def _ids(fields):
    return "-".join(f"{k}={v}" for k, v in fields.items()) or "defaults"


@pytest.mark.parametrize("fields", FORM_CASES, ids=_ids)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_two_phase_equals_the_direct_form(fields, order):
    cfg = released(any_step_order=order, **fields)
    model = AnyStepToy(seed=1)
    x0, z, t, c, m = batch(n=7, seed=3)
    direct = apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(7))
    direct["loss"].backward()
    direct_grads = grads(model)
    model.zero_grad()
    objective = two_phase_apex(x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(7))
    phased = run_two_phase(model, objective)
    phased["loss"].backward()
    assert sorted(direct) == sorted(phased) and direct["l_base"] > 0
    for key in direct:
        torch.testing.assert_close(phased[key], direct[key], rtol=1e-10, atol=1e-12, msg=key)
    phased_grads = grads(model)
    assert sorted(phased_grads) == sorted(direct_grads)
    for name in direct_grads:
        torch.testing.assert_close(phased_grads[name], direct_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("fields", [dict(w_fake=0.0, w_dm=0.0), dict(w_dm=0.0), dict(w_dm=0.7)], ids=_ids)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_two_phase_runs_one_segment_per_round(fields, order):
    cfg = released(any_step_order=order, **fields)
    own_rounds = {0.0: 0, 1.0: 1}[cfg.w_fake] if cfg.w_dm == 0 else 2
    model = AnyStepToy(seed=1)
    x0, z, t, c, m = batch(n=9, seed=4)
    objective = two_phase_apex(x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED))
    assert objective.num_rounds == max(own_rounds, order)
    b = released_batch(x0, z, t, c, m, cfg, torch.Generator().manual_seed(SEED), None)
    assert ((b.t_b > b.tt_b) & (b.t_b - b.tt_b < 0.01)).any()  # rows whose segments have zero length
    s0 = torch.maximum(b.t_b - 0.01, b.tt_b)
    times = [s0 * (1 - k / order) + b.tt_b * (k / order) for k in range(order + 1)]
    x = b.x_t - 0.01 * (z - x0)
    for r in range(objective.num_rounds):
        queries = objective.nograd_queries(r)
        with torch.no_grad():
            outputs = [model(q.x_t, q.t, q.context, context_mask=q.context_mask, fake_condition=q.fake_condition,
                             t_target=q.t_target) for q in queries]
        own = (1 if r == 0 and own_rounds > 0 else 0) + (2 if r == 1 and cfg.w_dm > 0 else 0)
        assert len(queries) == own + (1 if r < order else 0)
        if r < order:
            seg = queries[-1]
            torch.testing.assert_close(seg.t, times[r], rtol=0, atol=1e-15)
            torch.testing.assert_close(seg.t_target, times[r + 1], rtol=0, atol=1e-15)
            torch.testing.assert_close(seg.x_t, x, rtol=0, atol=1e-13)
            assert torch.equal(seg.context, c) and torch.equal(seg.context_mask, m)
            assert seg.fake_condition is False
            x = x - bt(times[r] - times[r + 1], x) * outputs[-1]
        objective.receive(r, outputs)
    with pytest.raises(IndexError):
        objective.nograd_queries(objective.num_rounds)


# ---- 6. the CFG-enhanced target leaves the e2e rows alone -----------------------------------------------

def test_cfg_enhances_every_base_row_but_the_e2e_jumps():
    cfg = base_only(cfg_scale=0.8, consistency_clamp=None)
    model = AnyStepToy(seed=1)
    x0, z, t, c, m = batch(n=9, seed=4)
    uncond = torch.zeros(1, *c.shape[1:], dtype=c.dtype)
    b = released_batch(x0, z, t, c, m, cfg, torch.Generator().manual_seed(SEED), None)
    got = _base_target(model, None, b, cfg, uncond, None)
    with torch.no_grad():
        gain = model(b.x_t, b.t_b, c, context_mask=m) - model(b.x_t, b.t_b, uncond.expand(9, *uncond.shape[1:]))
    enhanced = (b.t_b > 0) & (b.t_b < 1)
    want = torch.where(bt(enhanced, z), z - x0 + 0.8 * gain, z - x0)
    n_e2e = HAND_LENS[9][0]
    # make_batch's last row has t = 1: an "any" row that, as in the release, stays unenhanced too
    assert not enhanced[:n_e2e].any() and enhanced[n_e2e:-1].all() and b.t_b[-1] == 1 and b.tt_b[-1] < 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:n_e2e], (z - x0)[:n_e2e])
    assert gain[:n_e2e].abs().min() > 0  # enhancing the e2e rows would have changed them

    out = apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED),
                    uncond_context=uncond)
    with torch.no_grad():
        hand = hand_base_rows(model, x0, z, t, c, m, cfg, SEED, uncond=uncond)
        plain = hand_base_rows(model, x0, z, t, c, m, base_only(consistency_clamp=None), SEED)
    torch.testing.assert_close(out["l_base"], hand["residual"].pow(2).flatten(1).mean(1).mean(), rtol=1e-10, atol=0)
    assert not torch.allclose(out["l_base"], plain["residual"].pow(2).flatten(1).mean(1).mean())


# ---- 7. refusals and the command line --------------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    (dict(variant="released", any_step=True, w_consistency=0.5), "APEXConfig.w_consistency is the one-jump"),
    (dict(variant="released", any_step=True, any_step_order=0), "APEXConfig.any_step_order must be an integer >= 1"),
    (dict(variant="released", any_step=True, any_step_order=1.5), "APEXConfig.any_step_order must be an integer"),
    (dict(variant="released", any_step=True, any_step_order=True), "APEXConfig.any_step_order must be an integer"),
    (dict(variant="released", any_step="yes"), "APEXConfig.any_step must be a bool"),
    (dict(variant="paper", any_step=True), "APEXConfig.any_step only acts in variant 'released'"),
    (dict(variant="paper", any_step_order=3), "APEXConfig.any_step_order only acts in variant 'released'"),
])
def test_bad_any_step_settings_are_refused_in_one_line(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)) as err:
        APEXConfig(**fields)
    assert "\n" not in str(err.value)


def test_the_command_line_gives_a_bool_and_an_int():
    from megatron_apex.training.arguments import parse_args

    apex = parse_args(["--apex-variant", "released", "--apex-option", "any_step=true",
                       "--apex-option", "any_step_order=3"]).objective.apex
    assert apex["any_step"] is True
    assert type(apex["any_step_order"]) is int and apex["any_step_order"] == 3
    cfg = APEXConfig(**apex)
    assert cfg.any_step is True and cfg.any_step_order == 3
    with pytest.raises(ValueError, match=re.escape("--apex-option: APEXConfig.any_step_order must be an integer")):
        parse_args(["--apex-variant", "released", "--apex-option", "any_step=true",
                    "--apex-option", "any_step_order=1.5"])


# ---- 8. the option off ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_split", [None, 0.5])
def test_off_the_base_rows_are_velocity_queries_and_the_stream_is_untouched(batch_split):
    x0, z, t, c, m = batch(n=6)
    states = {}
    for on in (False, True):
        cfg = APEXConfig(variant="released", any_step=on, batch_split=batch_split)
        gen = torch.Generator().manual_seed(SEED)
        b = released_batch(x0, z, t, c, m, cfg, gen, None)
        states[on] = (b, gen.get_state())
    b_off, after_off = states[False]
    assert b_off.tt_b is None and base_query(b_off).t_target is None
    base = slice(None) if batch_split is None else slice(3, None)
    assert torch.equal(b_off.t_b, t[base])
    n_gen = 6 if batch_split is None else 3
    only_fresh = torch.Generator().manual_seed(SEED)
    draw_fresh(n_gen, SHAPE, APEXConfig(variant="released"), only_fresh, x0.device, x0.dtype, t.dtype)
    assert torch.equal(after_off, only_fresh.get_state())
    # on, released_batch makes one more draw (so the comparison above could fail)
    assert not torch.equal(states[True][1], after_off)
    torch.rand(6 - (0 if batch_split is None else 3), generator=only_fresh, dtype=t.dtype)
    assert torch.equal(states[True][1], only_fresh.get_state())


def test_off_the_model_is_never_asked_a_jump_from_the_base_rows():
    """With any_step off, every grad-carrying call (the base query and the fake flow) is a plain
    velocity query; on, the base query carries its target times."""
    calls = {}
    for on in (False, True):
        seen = []
        inner = AnyStepToy(seed=1)

        def model(x_t, t, context, context_mask=None, fake_condition=False, t_target=None, inner=inner, seen=seen):
            if torch.is_grad_enabled():
                seen.append(None if t_target is None else t_target.clone())
            return inner(x_t, t, context, context_mask, fake_condition, t_target)

        x0, z, t, c, m = batch(n=6)
        apex_loss(model, x0, z, t, c, m, APEXConfig(variant="released", w_dm=0.0, any_step=on,
                                                    fuse_forwards=False),
                  generator=torch.Generator().manual_seed(SEED))
        calls[on] = seen
    assert calls[False] == [None, None]
    assert calls[True][0] is not None and calls[True][1] is None


def test_the_release_preset_turns_it_on_at_order_2():
    cfg = APEXConfig.preset("release")
    assert cfg.any_step is True and cfg.any_step_order == 2 and cfg.w_consistency == 0
