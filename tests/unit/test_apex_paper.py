"""Variant "paper" of the APEX objective against references written straight from the
spec's equations (Eqs. 10-12, 14, 20-25), plus Theorem 1 and the config's validation."""

import pytest
import torch

from _toy_models import ToyVelocityModel, make_batch
from megatron_apex.objectives.apex import APEXConfig, apex_loss, consistency_loss, supervised_loss
from megatron_apex.objectives.fm import fm_loss


# ---- the reference, from the paper's equations ---------------------------------------------------

def bt(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def hand_weight(t, weighting):
    return {"paper": (1 - t) / t, "endpoint": torch.ones_like(t), "velocity": 1 / t ** 2}[weighting]


def sq(a, b):  # ||a - b||^2 averaged over the non-batch elements -> (B,)
    return ((a - b) ** 2).flatten(1).mean(1)


def reference_paper(model, x0, z, t, c, m, lam, lambda_p, lambda_e, weighting, fake_grad, sg_v_fake=True):
    tb = bt(t, x0)
    x_t = tb * z + (1 - tb) * x0
    F = model(x_t, t, c, context_mask=m)
    if sg_v_fake:
        with torch.no_grad():
            v_fake = model(x_t, t, c, context_mask=m, fake_condition=True)   # Eq. 14
    else:  # deliberately wrong: lets gradients into the fake branch
        v_fake = model(x_t, t, c, context_mask=m, fake_condition=True)
    T_mix = (1 - lam) * x0 + lam * (x_t - tb * v_fake)                     # Eq. 23
    l_mix = (hand_weight(t, weighting) * sq(x_t - tb * F, T_mix)).mean()    # Eq. 24
    x_fake = x_t - tb * F                                                   # Eq. 11
    if fake_grad == "detach":
        x_fake = x_fake.detach()
    x_t_fake = tb * z + (1 - tb) * x_fake
    F_fake = model(x_t_fake, t, c, context_mask=m, fake_condition=True)
    l_fake = sq(F_fake, z - x_fake).mean()                                  # Eq. 12
    return lambda_p * l_fake + lambda_e * l_mix, l_fake, l_mix              # Eq. 25


def grads(loss, params):
    out = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def assert_grads_close(a, b):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb)


def model_and_batch(sample_shape=(2, 3, 3)):
    # a learnable diagonal shift gives the fake branch parameters of its own
    model = ToyVelocityModel(sample_shape=sample_shape, shift_kind="diagonal", a=-0.5, b=1.0).double()
    return model, [p for p in model.parameters()], make_batch(sample_shape=sample_shape)


# ---- value and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["paper", "endpoint", "velocity"])
@pytest.mark.parametrize("fake_grad", ["detach", "through"])
def test_paper_value_and_grads_match_reference(weighting, fake_grad):
    model, params, (x0, z, t, c, m) = model_and_batch()
    cfg = APEXConfig(variant="paper", lam=0.3, lambda_p=0.7, lambda_e=1.3, weighting=weighting, fake_grad=fake_grad)
    out = apex_loss(model, x0, z, t, c, m, cfg)
    assert set(out) == {"loss", "l_fake", "l_mix"} and all(v.dim() == 0 for v in out.values())
    ref, l_fake, l_mix = reference_paper(model, x0, z, t, c, m, 0.3, 0.7, 1.3, weighting, fake_grad)
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(out["l_fake"], l_fake)
    torch.testing.assert_close(out["l_mix"], l_mix)
    assert_grads_close(grads(out["loss"], params), grads(ref, params))


def test_paper_variant_is_shape_agnostic():
    model, params, (x0, z, t, c, m) = model_and_batch(sample_shape=(7,))
    cfg = APEXConfig(variant="paper", lam=0.6, weighting="endpoint")
    out = apex_loss(model, x0, z, t, c, m, cfg)
    ref, _, _ = reference_paper(model, x0, z, t, c, m, 0.6, 1.0, 1.0, "endpoint", "detach")
    torch.testing.assert_close(out["loss"], ref)
    assert_grads_close(grads(out["loss"], params), grads(ref, params))


# ---- Theorem 1 ----------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["paper", "endpoint", "velocity"])
@pytest.mark.parametrize("lam", [0.25, 0.8])
def test_theorem1_grad_mix_equals_grad_of_sup_cons_mixture(weighting, lam):
    """Theorem 1 (Eqs. 20-22, 63): grad L_mix = grad((1-lam) L_sup + lam L_cons) for every
    parameter. The paper states it with w = 1/omega(t); the identity holds per sample, so it
    holds for any weighting shared by the three terms, which is what is checked here."""
    model, params, (x0, z, t, c, m) = model_and_batch()
    cfg = APEXConfig(variant="paper", lam=lam, lambda_p=0.0, weighting=weighting)
    l_mix = apex_loss(model, x0, z, t, c, m, cfg)["l_mix"]

    tb = bt(t, x0)
    x_t = tb * z + (1 - tb) * x0
    F = model(x_t, t, c, context_mask=m)
    with torch.no_grad():
        v_fake = model(x_t, t, c, context_mask=m, fake_condition=True)
    w = hand_weight(t, weighting)
    l_sup = (w * sq(x_t - tb * F, x0)).mean()                          # Eq. 20
    l_cons = (w * sq(x_t - tb * F, x_t - tb * v_fake)).mean()          # Eqs. 21-22
    mixture = (1 - lam) * l_sup + lam * l_cons

    assert_grads_close(grads(l_mix, params), grads(mixture, params))
    # the values differ by the theta-free constant lam(1-lam) w ||x - f_x(v_fake)||^2
    const = lam * (1 - lam) * (w * sq(x0, x_t - tb * v_fake)).mean()
    torch.testing.assert_close(l_mix, mixture - const)
    # the module's Eq. 20-22 helpers agree with the hand versions
    torch.testing.assert_close(supervised_loss(F, x_t, t, x0, weighting).mean(), l_sup)
    torch.testing.assert_close(consistency_loss(F, x_t, t, v_fake, weighting).mean(), l_cons)

    # the comparison has teeth: a mixture whose L_cons uses another weighting differs
    other = "endpoint" if weighting != "endpoint" else "velocity"
    wrong = (1 - lam) * l_sup + lam * (hand_weight(t, other) * sq(x_t - tb * F, x_t - tb * v_fake)).mean()
    assert any(not torch.allclose(a, b) for a, b in zip(grads(l_mix, params), grads(wrong, params)))


# ---- special cases ------------------------------------------------------------------------

def test_lam0_lambda_p0_velocity_weighting_is_flow_matching():
    model, params, (x0, z, t, c, m) = model_and_batch()
    cfg = APEXConfig(variant="paper", lam=0.0, lambda_p=0.0, weighting="velocity")
    out = apex_loss(model, x0, z, t, c, m, cfg)
    fm = fm_loss(model, x0, z, t, c, m)["loss"]
    torch.testing.assert_close(out["loss"], fm)
    assert_grads_close(grads(out["loss"], params), grads(fm, params))


@pytest.mark.parametrize("weighting,factor", [("endpoint", lambda t: t ** 2), ("paper", lambda t: t * (1 - t))])
def test_lam0_lambda_p0_other_weightings_are_reweighted_flow_matching(weighting, factor):
    """||f_x(F) - x||^2 = t^2 ||F - (z - x)||^2, so the other weightings are FM reweighted by w t^2."""
    model, params, (x0, z, t, c, m) = model_and_batch()
    out = apex_loss(model, x0, z, t, c, m, APEXConfig(variant="paper", lam=0.0, lambda_p=0.0, weighting=weighting))
    tb = bt(t, x0)
    F = model(tb * z + (1 - tb) * x0, t, c, context_mask=m)
    ref = (factor(t) * sq(F, z - x0)).mean()
    torch.testing.assert_close(out["loss"], ref)
    assert_grads_close(grads(out["loss"], params), grads(ref, params))


def test_fake_grad_detach_stops_and_through_passes_the_gradient_through_x_fake():
    model, params, (x0, z, t, c, m) = model_and_batch()
    got = {}
    for mode in ("detach", "through"):
        cfg = APEXConfig(variant="paper", lam=0.0, lambda_e=0.0, fake_grad=mode)  # L_fake alone
        loss = apex_loss(model, x0, z, t, c, m, cfg)["loss"]
        ref = reference_paper(model, x0, z, t, c, m, 0.0, 1.0, 0.0, "paper", mode)[0]
        got[mode] = grads(loss, params)
        assert_grads_close(got[mode], grads(ref, params))
    # the two differ exactly by the path through x_fake = x_t - t F(x_t, t, c)
    assert any(not torch.allclose(a, b) for a, b in zip(got["detach"], got["through"]))


def test_v_fake_carries_no_gradient():
    """The fake branch's own parameters (the learnable shift) get nothing from L_mix."""
    model, params, (x0, z, t, c, m) = model_and_batch()
    cfg = APEXConfig(variant="paper", lam=0.7, lambda_p=0.0, weighting="endpoint")
    loss = apex_loss(model, x0, z, t, c, m, cfg)["loss"]
    shift_params = [model.shift.A, model.shift.b]
    for g in grads(loss, shift_params):
        assert torch.count_nonzero(g) == 0
    # a reference that (wrongly) keeps v_fake's gradient does reach them: the check has teeth
    leaky = reference_paper(model, x0, z, t, c, m, 0.7, 0.0, 1.0, "endpoint", "detach", sg_v_fake=False)[0]
    assert all(torch.count_nonzero(g) > 0 for g in grads(leaky, shift_params))
    # while L_fake (Eq. 12) is what trains them
    with_fake = apex_loss(model, x0, z, t, c, m, APEXConfig(variant="paper", lam=0.7))["loss"]
    assert all(torch.count_nonzero(g) > 0 for g in grads(with_fake, shift_params))


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("variant", "twinflow"), ("lam", 1.5), ("lam", -0.1), ("lambda_p", -1.0), ("lambda_e", float("nan")),
    ("weighting", "sigmoid"), ("fake_grad", "stop"), ("w_dm", -0.5), ("dm_clamp", 0.0),
    ("dm_warmup_steps", -3), ("dm_warmup_steps", 2.5), ("fresh_t_min", 0.0), ("fresh_t_max", 1.5),
    ("batch_split", 1.0), ("consistency_step", 0.0), ("consistency_clamp", -1.0), ("shift_a", "minus one"),
    ("dm_normalize", "yes"),
])
def test_bad_config_values_raise_naming_the_field(field, value):
    kwargs = {"variant": "released", field: value} if field != "variant" else {field: value}
    with pytest.raises(ValueError, match=f"APEXConfig.{field}"):
        APEXConfig(**kwargs)


@pytest.mark.parametrize("field,value", [("cfg_scale", 0.8), ("w_consistency", 1.0), ("batch_split", 0.5)])
def test_released_only_options_are_refused_for_paper(field, value):
    APEXConfig(variant="released", **{field: value})  # fine where it acts
    with pytest.raises(ValueError, match=f"APEXConfig.{field}"):
        APEXConfig(variant="paper", **{field: value})


def test_bad_inputs_raise():
    model, _, (x0, z, t, c, m) = model_and_batch()
    cfg = APEXConfig()
    with pytest.raises(ValueError, match="t must have shape"):
        apex_loss(model, x0, z, t[:-1], c, m, cfg)
    with pytest.raises(ValueError, match="noise shape"):
        apex_loss(model, x0, z[:, :1], t, c, m, cfg)
    with pytest.raises(ValueError, match="context batch"):
        apex_loss(model, x0, z, t, c[:-1], m, cfg)
    with pytest.raises(ValueError, match="APEXConfig"):
        apex_loss(model, x0, z, t, c, m, {"variant": "paper"})
