"""Variant "released" of the APEX objective (docs/apex_method.md, points 1-5) against a reference
written straight from the spec, plus the direction of the distribution-matching update."""

import pytest
import torch
from torch import nn

from _toy_models import ToyVelocityModel, make_batch
from megatron_apex.objectives.apex import APEXConfig, apex_loss

SEED = 123


# ---- the reference, from docs/apex_method.md-------------------------------------------------

def bt(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def sq(a, b):  # ||a - b||^2 averaged over the non-batch elements -> (B,)
    return ((a - b) ** 2).flatten(1).mean(1)


def fresh_draws(n, shape, cfg, seed, dtype=torch.float64):
    """The documented draw order: u' (n,), z' (n, ...), u'' (n,), z'' (n, ...)."""
    g = torch.Generator().manual_seed(seed)
    span = cfg.fresh_t_max - cfg.fresh_t_min
    t1 = cfg.fresh_t_min + span * torch.rand(n, generator=g, dtype=dtype)
    z1 = torch.randn((n, *shape), generator=g, dtype=dtype)
    t2 = cfg.fresh_t_min + span * torch.rand(n, generator=g, dtype=dtype)
    z2 = torch.randn((n, *shape), generator=g, dtype=dtype)
    return t1, z1, t2, z2


def reference_released(model, x0, z, t, c, m, cfg, seed=SEED, teacher=None, dm_on=True,
                       uncond=None, gen_rows=slice(None), base_rows=slice(None)):
    zg, cg, mg = z[gen_rows], c[gen_rows], m[gen_rows]
    t1, z1, t2, z2 = fresh_draws(zg.shape[0], zg.shape[1:], cfg, seed)
    # 2. one-step generation, jumping from t = 1 to tt = 0, with gradient
    ones = torch.ones(zg.shape[0], dtype=t.dtype)
    F_g = model(zg, ones, cg, context_mask=mg, t_target=torch.zeros_like(ones))
    x_g = (zg - F_g).detach()
    # 1. base flow matching on data (optionally CFG-enhanced)
    xb, zb, tb_, cb, mb = x0[base_rows], z[base_rows], t[base_rows], c[base_rows], m[base_rows]
    x_t = bt(tb_, xb) * zb + (1 - bt(tb_, xb)) * xb
    target = zb - xb
    if uncond is not None:
        ref = teacher if teacher is not None else model
        with torch.no_grad():
            uc = uncond.expand(xb.shape[0], *uncond.shape[1:])
            target = target + cfg.cfg_scale * (ref(x_t, tb_, cb, context_mask=mb) - ref(x_t, tb_, uc))
    l_base = sq(model(x_t, tb_, cb, context_mask=mb), target).mean()
    # 3. fake flow on fresh t', z' from sg(x_g), under c_fake
    y1 = bt(t1, x_g) * z1 + (1 - bt(t1, x_g)) * x_g
    l_fake = sq(model(y1, t1, cg, context_mask=mg, fake_condition=True), z1 - x_g).mean()
    # 4. distribution matching on fresh t'', z''
    if dm_on:
        y2 = bt(t2, x_g) * z2 + (1 - bt(t2, x_g)) * x_g
        real = teacher if teacher is not None else model
        with torch.no_grad():
            g = model(y2, t2, cg, context_mask=mg, fake_condition=True) - real(y2, t2, cg, context_mask=mg)
            if cfg.dm_normalize:
                g = g / bt(g.pow(2).flatten(1).mean(1).sqrt(), g)
            if cfg.dm_clamp is not None:
                g = g.clamp(-cfg.dm_clamp, cfg.dm_clamp)
        l_dm = sq(F_g, (F_g - g).detach()).mean()
    else:
        g, l_dm = None, torch.zeros((), dtype=torch.float64)
    loss = cfg.w_base * l_base + cfg.w_fake * l_fake + cfg.w_dm * l_dm
    return dict(loss=loss, l_base=l_base, l_fake=l_fake, l_dm=l_dm, g=g, F_g=F_g)


def grads(loss, params):
    out = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def assert_grads_close(a, b):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb)


def setup(shift_kind="diagonal", batch=5):
    model = ToyVelocityModel(shift_kind=shift_kind, a=-1.0, b=0.0).double()
    return model, list(model.parameters()), make_batch(batch=batch)


def run(model, batch, cfg, seed=SEED, **kw):
    x0, z, t, c, m = batch
    return apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(seed), **kw)


# ---- value and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("normalize,clamp", [(False, 1.0), (False, 0.05), (True, None), (True, 0.5)])
def test_released_value_and_grads_match_reference(fuse, normalize, clamp):
    model, params, batch = setup()
    cfg = APEXConfig(variant="released", w_base=1.0, w_fake=0.8, w_dm=0.5, fuse_forwards=fuse,
                     dm_normalize=normalize, dm_clamp=clamp)
    out = run(model, batch, cfg)
    assert set(out) == {"loss", "l_base", "l_fake", "l_dm"} and all(v.dim() == 0 for v in out.values())
    ref = reference_released(model, *batch, cfg)
    if clamp is not None and clamp < 1.0:  # the clamp is active here, so it is tested
        assert float(ref["g"].abs().max()) == clamp
    for k in ("loss", "l_base", "l_fake", "l_dm"):
        torch.testing.assert_close(out[k], ref[k])
    assert_grads_close(grads(out["loss"], params), grads(ref["loss"], params))


def test_dm_gradient_is_g_on_the_one_step_output():
    """d l_dm / d theta = mean_B (2/N) <g, dF_g/dtheta>: the DM term only pushes g into F_g."""
    model, params, batch = setup()
    cfg = APEXConfig(variant="released", w_base=0.0, w_fake=0.0, w_dm=1.0)
    out = run(model, batch, cfg)
    ref = reference_released(model, *batch, cfg)
    n = ref["F_g"][0].numel()
    surrogate = (2.0 / n * (ref["F_g"] * ref["g"]).flatten(1).sum(1)).mean()
    assert_grads_close(grads(out["l_dm"], params), grads(surrogate, params))
    torch.testing.assert_close(out["l_dm"], ref["g"].pow(2).mean())  # its value is mean(g^2)


def test_teacher_supplies_the_real_velocity_and_gets_no_gradient():
    model, params, batch = setup()
    teacher = ToyVelocityModel(shift_kind="diagonal", seed=7).double()
    cfg = APEXConfig(variant="released")
    out = run(model, batch, cfg, teacher=teacher)
    ref = reference_released(model, *batch, cfg, teacher=teacher)
    torch.testing.assert_close(out["loss"], ref["loss"])
    assert_grads_close(grads(out["loss"], params), grads(ref["loss"], params))
    assert not torch.allclose(out["l_dm"], run(model, batch, cfg)["l_dm"])  # the teacher matters
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_reproducible_with_the_same_generator_and_different_with_another():
    model, _, batch = setup()
    cfg = APEXConfig(variant="released")
    a, b, other = run(model, batch, cfg, seed=1), run(model, batch, cfg, seed=1), run(model, batch, cfg, seed=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.allclose(a["l_fake"], other["l_fake"])
    assert not torch.allclose(a["l_dm"], other["l_dm"])
    torch.testing.assert_close(a["l_base"], other["l_base"])  # the data term draws nothing fresh
    x0, z, t, c, m = batch
    assert torch.isfinite(apex_loss(model, x0, z, t, c, m, cfg)["loss"])  # no generator: global RNG


def test_dm_warmup_holds_the_dm_term_off():
    model, params, batch = setup()
    cfg = APEXConfig(variant="released", dm_warmup_steps=5)
    held = run(model, batch, cfg, step=4)
    no_dm = reference_released(model, *batch, cfg, dm_on=False)
    assert float(held["l_dm"]) == 0.0
    torch.testing.assert_close(held["loss"], no_dm["loss"])
    assert_grads_close(grads(held["loss"], params), grads(no_dm["loss"], params))
    on = run(model, batch, cfg, step=5)
    torch.testing.assert_close(on["loss"], reference_released(model, *batch, cfg)["loss"])
    assert float(on["l_dm"].detach()) > 0
    with pytest.raises(ValueError, match="APEXConfig.dm_warmup_steps"):
        run(model, batch, cfg)


def test_cfg_enhanced_base_target():
    model, params, batch = setup()
    teacher = ToyVelocityModel(shift_kind="diagonal", seed=3).double()
    cfg = APEXConfig(variant="released", cfg_scale=0.8)
    with pytest.raises(ValueError, match="APEXConfig.cfg_scale.*uncond_context"):
        run(model, batch, cfg, teacher=teacher)
    uncond = torch.zeros(1, *batch[3].shape[1:], dtype=torch.float64)
    out = run(model, batch, cfg, teacher=teacher, uncond_context=uncond)
    ref = reference_released(model, *batch, cfg, teacher=teacher, uncond=uncond)
    torch.testing.assert_close(out["l_base"], ref["l_base"])
    assert_grads_close(grads(out["loss"], params), grads(ref["loss"], params))
    plain = run(model, batch, APEXConfig(variant="released"), teacher=teacher)
    assert not torch.allclose(out["l_base"], plain["l_base"])


def test_batch_split_feeds_the_generator_and_the_base_term_disjoint_rows():
    model, params, batch = setup(batch=5)
    cfg = APEXConfig(variant="released", batch_split=0.4)  # 2 generator rows, 3 base rows
    out = run(model, batch, cfg)
    ref = reference_released(model, *batch, cfg, gen_rows=slice(0, 2), base_rows=slice(2, None))
    for k in ("loss", "l_base", "l_fake", "l_dm"):
        torch.testing.assert_close(out[k], ref[k])
    assert_grads_close(grads(out["loss"], params), grads(ref["loss"], params))
    with pytest.raises(ValueError, match="APEXConfig.batch_split"):
        x0, z, t, c, m = batch
        apex_loss(model, x0[:1], z[:1], t[:1], c[:1], m[:1], cfg)


@pytest.mark.parametrize("clamp", [None, 0.05])
def test_flow_map_consistency_term(clamp):
    model, params, batch = setup()
    x0, z, t, c, m = batch
    t = t.clone()
    t[0] = 0.005  # below the step: the residual is jump - velocity
    batch = (x0, z, t, c, m)
    cfg = APEXConfig(variant="released", w_consistency=0.5, consistency_step=0.01, consistency_clamp=clamp)
    out = run(model, batch, cfg)

    # residual of t*u(x_t) = (t-s)*v + s*u(x_s), divided by the segment length t-s
    tb = bt(t, x0)
    x_t = tb * z + (1 - tb) * x0
    zeros = torch.zeros_like(t)
    jump = model(x_t, t, c, context_mask=m, t_target=zeros)
    with torch.no_grad():
        v = model(x_t, t, c, context_mask=m)
        s = (t - 0.01).clamp(min=0)
        x_s = x_t - bt(t - s, x0) * v
        jump_s = model(x_s, s, c, context_mask=m, t_target=zeros)
        R = (tb * jump - bt(t - s, x0) * v - bt(s, x0) * jump_s) / bt(t - s, x0)
        torch.testing.assert_close(R[0], (jump - v)[0])
        if clamp is not None:
            assert float(R.abs().max()) > clamp  # the clamp is active here, so it is tested
            R = R.clamp(-clamp, clamp)
    torch.testing.assert_close(out["l_consistency"], R.pow(2).mean())
    # its gradient is R on the jump: mean_B (2/N) <R, d jump / d theta>
    surrogate = (2.0 / x0[0].numel() * (jump * R).flatten(1).sum(1)).mean()
    ref = reference_released(model, *batch, cfg)["loss"] + 0.5 * surrogate
    assert_grads_close(grads(out["loss"], params), grads(ref, params))


# ---- the direction of the distribution-matching update -------------------------------------

class PointModel(nn.Module):
    """Toy problem with known velocity fields. The generator maps every z to a learnable
    point a (one-step jump: F = z - a). The data distribution is a point mass at b, so the
    real velocity is (x_t - b)/t; the model's generated distribution is a point mass at a,
    so the fake branch's velocity is (x_t - sg(a))/t."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.register_buffer("b", b.clone())

    def forward(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        if t_target is not None:
            return x_t - self.a
        fake = fake_condition if isinstance(fake_condition, torch.Tensor) else \
            torch.full((x_t.shape[0],), bool(fake_condition))
        centre = torch.where(bt(fake, x_t), self.a.detach().expand_as(x_t), self.b.expand_as(x_t))
        return (x_t - centre) / bt(t, x_t)


@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_dm_step_moves_generated_samples_toward_the_data(with_teacher, normalize):
    """g = v_fake - v_real = (b - a)/t; the loss puts gradient +g on F_g = z - a, so SGD moves
    a by +lr*g, toward b. A sign error would move it away and fail this test."""
    b = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    model = PointModel(torch.zeros(4, dtype=torch.float64), b)
    teacher = PointModel(torch.zeros(4, dtype=torch.float64), b) if with_teacher else None
    cfg = APEXConfig(variant="released", w_base=0.0, w_fake=0.0, w_dm=1.0, dm_normalize=normalize,
                     dm_clamp=None if normalize else 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x0 = torch.zeros(8, 4, dtype=torch.float64)
    c = torch.zeros(8, 1, 1, dtype=torch.float64)
    start = (model.a - b).abs().clone().detach()
    for i in range(80):
        gen = torch.Generator().manual_seed(i)
        z = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        t = torch.rand(8, generator=gen, dtype=torch.float64) * 0.9 + 0.1
        loss = apex_loss(model, x0, z, t, c, None, cfg, generator=gen, teacher=teacher)["loss"]
        opt.zero_grad()
        loss.backward()
        before = (model.a - b).abs().detach().clone()
        opt.step()
        if i == 0:  # every coordinate moves toward b on the first step
            assert bool(((model.a - b).abs() < before).all())
    assert bool(((model.a - b).abs() < 0.1 * start).all())
