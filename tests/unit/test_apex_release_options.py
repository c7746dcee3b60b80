"""The released variant's options that follow the authors' released code (APEXConfig.fake_time_flag,
.loss = "pseudo_huber", .tan_weight) and the `release` preset: each against a hand-written
reference, the direct and the two-phase forms against each other, the preset against the table
of docs/apex_method.md, and every option off against today's objective."""

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from _toy_models import ToyVelocityModel, make_batch
from megatron_apex.objectives.apex import (APEXConfig, apex_loss, pseudo_huber, run_two_phase, tan_weight,
                                           two_phase_apex)
from megatron_apex.objectives.apex.released import (distribution_matching_direction, fake_flow_term,
                                                    one_step_generation, released_batch)
from megatron_apex.objectives.flow import per_sample_mse

REPO = Path(__file__).resolve().parents[2]
SEED = 11
NEW_FIELDS = ("fake_time_flag", "loss", "huber_c", "tan_weight")


# ---- the reference, written from docs/apex_method.md and the release's description ----------

def bt(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def sq(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


def hand_huber(mse, c):
    weight = 1.0 / torch.sqrt(mse.detach() / (c * c + 1e-8) + 1.0)
    return mse * weight / c


def reference(model, x0, z, t, c, m, cfg, seed=SEED, teacher=None):
    """loss, l_base, l_fake, l_dm of the released variant with the three options as cfg says."""
    g = torch.Generator().manual_seed(seed)
    n, shape, span = z.shape[0], z.shape[1:], cfg.fresh_t_max - cfg.fresh_t_min
    t1 = cfg.fresh_t_min + span * torch.rand(n, generator=g, dtype=t.dtype)
    z1 = torch.randn((n, *shape), generator=g, dtype=z.dtype)
    t2 = cfg.fresh_t_min + span * torch.rand(n, generator=g, dtype=t.dtype)
    z2 = torch.randn((n, *shape), generator=g, dtype=z.dtype)
    loss_of = (lambda mse: hand_huber(mse, cfg.huber_c)) if cfg.loss == "pseudo_huber" else (lambda mse: mse)
    sign = -1.0 if cfg.fake_time_flag else 1.0

    ones = torch.ones(n, dtype=t.dtype)
    F_g = model(z, ones, c, context_mask=m, t_target=torch.zeros_like(ones))
    x_g = (z - F_g).detach()
    x_t = bt(t, x0) * z + (1 - bt(t, x0)) * x0
    weight = (math.tan((1 - 0) * math.pi / 2.5) + 1) if cfg.tan_weight else 1.0  # base rows: |t| - |tt| = 0
    l_base = (weight * loss_of(sq(model(x_t, t, c, context_mask=m), z - x0))).mean()
    y1 = bt(t1, x_g) * z1 + (1 - bt(t1, x_g)) * x_g
    v1 = model(y1, sign * t1, c, context_mask=m, fake_condition=True, t_target=sign * t1)
    l_fake = loss_of(sq(v1, z1 - x_g)).mean()
    y2 = bt(t2, x_g) * z2 + (1 - bt(t2, x_g)) * x_g
    with torch.no_grad():
        v_fake = model(y2, sign * t2, c, context_mask=m, fake_condition=True, t_target=sign * t2)
        v_real = (teacher or model)(y2, t2, c, context_mask=m)
        direction = (v_fake - v_real).clamp(-cfg.dm_clamp, cfg.dm_clamp)
    l_dm = loss_of(sq(F_g, F_g.detach() - direction)).mean()
    loss = cfg.w_base * l_base + cfg.w_fake * l_fake + cfg.w_dm * l_dm
    return {"loss": loss, "l_base": l_base, "l_fake": l_fake, "l_dm": l_dm}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(seed=1):
    return ToyVelocityModel(seed=seed, learnable=True).double()


def _loss_and_grads(fn, model):
    model.zero_grad()
    out = fn()
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(model)


OPTION_CASES = [dict(fake_time_flag=True), dict(loss="pseudo_huber"), dict(loss="pseudo_huber", huber_c=0.05),
                dict(tan_weight=True), dict(fake_time_flag=True, loss="pseudo_huber", tan_weight=True, w_dm=0.7)]


def _ids(fields):
    return "-".join(f"{k}={v}" for k, v in fields.items())


@pytest.mark.parametrize("fields", OPTION_CASES, ids=_ids)
@pytest.mark.parametrize("fuse", [True, False])
def test_each_option_matches_the_hand_written_reference(fields, fuse):
    cfg = APEXConfig(variant="released", fuse_forwards=fuse, **fields)
    model = _model()
    x0, z, t, c, m = make_batch(batch=5)
    got, got_grads = _loss_and_grads(
        lambda: apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED)), model)
    want, want_grads = _loss_and_grads(lambda: reference(model, x0, z, t, c, m, cfg), model)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=key)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    # the option changes the numbers (so the comparison above could fail)
    plain, _ = _loss_and_grads(lambda: reference(model, x0, z, t, c, m, APEXConfig(variant="released")), model)
    assert not torch.allclose(plain["loss"], want["loss"])


# ---- option 1: the fake queries' time flag ---------------------------------------------------

class Recorder(torch.nn.Module):
    """Model-contract wrapper recording each call's per-row (t, t_target, fake_condition)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        fake = fake_condition if isinstance(fake_condition, torch.Tensor) else \
            torch.full((t.shape[0],), bool(fake_condition))
        tt = t if t_target is None else t_target
        self.rows += [(float(a), float(b), bool(f)) for a, b, f in zip(t, tt, fake)]
        return self.inner(x_t, t, context, context_mask, fake_condition, t_target)


@pytest.mark.parametrize("form", ["direct", "two-phase"])
@pytest.mark.parametrize("fuse", [True, False])
def test_fake_queries_run_at_minus_t_with_the_fake_condition(form, fuse):
    cfg = APEXConfig(variant="released", fake_time_flag=True, fuse_forwards=fuse)
    model = Recorder(_model())
    x0, z, t, c, m = make_batch(batch=4)
    if form == "direct":
        apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED))
    else:
        run_two_phase(model, two_phase_apex(x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED)))
    b = released_batch(x0, z, t, c, m, cfg, torch.Generator().manual_seed(SEED), None)
    fresh = sorted((-b.fresh.t_fake).tolist() + (-b.fresh.t_dm).tolist())
    flagged = [(tq, tt) for tq, tt, fake in model.rows if fake]
    assert sorted(tq for tq, _ in flagged) == fresh
    assert all(tt == tq for tq, tt in flagged)  # (t, tt) = (-t, -t)
    # every other query keeps a time in [0, 1]: the real DM velocity, the base rows, the one-step
    # jump (twice in two phases: its no-grad round and the training pass)
    others = [(tq, tt) for tq, tt, fake in model.rows if not fake]
    assert len(others) == 4 * (3 if form == "direct" else 4)
    assert all(0 <= tq <= 1 and 0 <= tt <= 1 for tq, tt in others)


def test_the_flag_is_the_only_difference_of_the_fake_queries():
    """Off, the same fake queries run at (t, t): the flag changes their time inputs only."""
    x0, z, t, c, m = make_batch(batch=4)
    rows = {}
    for flag in (False, True):
        model = Recorder(_model())
        apex_loss(model, x0, z, t, c, m, APEXConfig(variant="released", fake_time_flag=flag),
                  generator=torch.Generator().manual_seed(SEED))
        rows[flag] = model.rows
    assert [(abs(a), abs(b), f) for a, b, f in rows[True]] == [(a, b, f) for a, b, f in rows[False]]
    assert any(a < 0 for a, _, _ in rows[True]) and not any(a < 0 for a, _, _ in rows[False])


@pytest.fixture(scope="module")
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


@pytest.mark.parametrize("target_time_embedder", [True, False])
def test_a_model_takes_the_flagged_time(megatron_single_process, target_time_embedder):
    """The Qwen-Image model at (t, tt) = (-t, -t): both time embedders see the sign (the output
    differs from (t, t)) and the target-time term is zero (tt = -t equals no tt at t = -t)."""
    from megatron_apex.families import build_model, get_model_config

    config = get_model_config("qwen-image-tiny-test", target_time_embedder=target_time_embedder)
    model = build_model(config, backend="local").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(2, config.out_channels, 4, 4, generator=gen)
    ctx = torch.randn(2, 3, config.joint_attention_dim, generator=gen)
    t = torch.tensor([0.3, 0.8])
    with torch.enable_grad():  # the target-time embedder runs (it is skipped in no-grad velocity queries)
        flagged = model(x, -t, ctx, fake_condition=True, t_target=-t)
        unflagged_target = model(x, -t, ctx, fake_condition=True)
        positive = model(x, t, ctx, fake_condition=True, t_target=t)
    assert torch.isfinite(flagged).all()
    assert torch.equal(flagged, unflagged_target)
    assert not torch.allclose(flagged, positive)


# ---- option 2: the pseudo-Huber loss ---------------------------------------------------------

def test_pseudo_huber_value_and_gradient_by_hand():
    c, n = 1e-3, 6
    target = torch.zeros(3, n, dtype=torch.float64)
    pred = torch.tensor([[0.03] * n, [-0.3, 0.2, 0.1, 0.0, 0.4, -0.1], [5.0, -4.0, 3.0, 2.0, -1.0, 0.5]],
                        dtype=torch.float64, requires_grad=True)
    mse = ((pred - target) ** 2).mean(1)
    loss = pseudo_huber(mse, c)
    with torch.no_grad():
        for i in range(3):
            e = pred[i].tolist()
            m = sum(v * v for v in e) / n
            w = (m / (c * c + 1e-8) + 1) ** -0.5
            assert loss[i].item() == pytest.approx(m * w / c, rel=1e-12)
    loss.sum().backward()
    for i in range(3):
        e = pred[i].detach()
        m = float((e * e).mean())
        w = (m / (c * c + 1e-8) + 1) ** -0.5
        torch.testing.assert_close(pred.grad[i], 2 * e / n * w / c, rtol=1e-12, atol=0)
    # every sample's gradient has about the same norm, 2 sqrt((1 + eps / c^2) / n), whatever its error
    norms = pred.grad.norm(dim=1)
    expected = 2 * math.sqrt((1 + 1e-8 / c ** 2) / n)
    torch.testing.assert_close(norms, torch.full_like(norms, expected), rtol=2e-3, atol=0)
    mse_norms = torch.autograd.grad(((pred - target) ** 2).mean(1).sum(), pred)[0].norm(dim=1)
    assert mse_norms.max() / mse_norms.min() > 100  # the plain MSE's are far apart


def test_dm_direction_is_clamped_before_the_pseudo_huber_loss():
    """l_dm = pseudo_huber(mean(clamp(v_fake - v_real)^2)), its gradient on F_g clamp(g) w / c."""
    cfg = APEXConfig(variant="released", loss="pseudo_huber", w_base=0.0, w_fake=0.0)
    scale = torch.nn.Parameter(torch.tensor(3.0, dtype=torch.float64))

    def big(x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        """A velocity whose fake and real answers differ by up to ~10: the clamp acts."""
        f = fake_condition if isinstance(fake_condition, torch.Tensor) else torch.full((x_t.shape[0],),
                                                                                         bool(fake_condition))
        sign = torch.where(f, 1.0, -1.0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return scale * (x_t + sign * 2.0 * torch.sin(3 * x_t))

    x0, z, t, c, m = make_batch(batch=3)
    out = apex_loss(big, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED))
    b = released_batch(x0, z, t, c, m, cfg, torch.Generator().manual_seed(SEED), None)
    with torch.no_grad():
        f_g, x_g = one_step_generation(big, b.z_g, b.c_g, b.m_g, t.dtype)
        raw = distribution_matching_direction(big, None, x_g, b, APEXConfig(variant="released", dm_clamp=None))
    assert raw.abs().max() > 2  # the clamp has something to do
    clamped = raw.clamp(-1, 1)
    mse = (clamped ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out["l_dm"], hand_huber(mse, 1e-3).mean(), rtol=1e-12, atol=0)
    assert not torch.allclose(out["l_dm"], hand_huber((raw ** 2).flatten(1).mean(1), 1e-3).mean())
    # the gradient that reaches the one-step output is clamp(g) * w / c (per sample, over N and B)
    f_leaf = f_g.clone().requires_grad_(True)
    from megatron_apex.objectives.apex.released import distribution_matching_loss
    from megatron_apex.objectives.apex.release_options import per_sample_loss
    per_sample_loss(distribution_matching_loss(f_leaf, clamped), cfg).mean().backward()
    n = clamped[0].numel()
    w = (mse / (1e-6 + 1e-8) + 1) ** -0.5
    torch.testing.assert_close(f_leaf.grad, 2 * clamped / n * bt(w, clamped) / 1e-3 / 3, rtol=1e-12, atol=0)


# ---- option 3: the tan weight ------------------------------------------------------------------

@pytest.mark.parametrize("t, tt", [(0.3, 0.3), (0.7, 0.2), (1.0, 0.0), (-0.4, -0.4), (0.9, 0.6)])
def test_tan_weight_is_the_formula(t, tt):
    got = tan_weight(torch.tensor([t], dtype=torch.float64), torch.tensor([tt], dtype=torch.float64))
    want = math.tan((1 - (abs(t) - abs(tt))) * math.pi / 2.5) + 1
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_tan_weight_scales_the_base_rows_by_a_constant():
    """Our base rows are velocity queries (tt = t): l_base is tan(0.4 pi) + 1 times the unweighted
    one, and the fake and DM terms keep weight 1."""
    x0, z, t, c, m = make_batch(batch=5)
    out = {}
    for on in (False, True):
        out[on] = apex_loss(_model(), x0, z, t, c, m, APEXConfig(variant="released", tan_weight=on),
                            generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(out[True]["l_base"], (math.tan(0.4 * math.pi) + 1) * out[False]["l_base"],
                               rtol=1e-12, atol=0)
    for key in ("l_fake", "l_dm"):
        assert torch.equal(out[True][key], out[False][key])


def test_tan_weight_on_the_consistency_jump_uses_tt_zero():
    x0, z, t, c, m = make_batch(batch=5)
    out = {}
    for on in (False, True):
        out[on] = apex_loss(_model(), x0, z, t, c, m,
                            APEXConfig(variant="released", tan_weight=on, w_consistency=1.0, consistency_clamp=None),
                            generator=torch.Generator().manual_seed(SEED))
    assert out[False]["l_consistency"] > 0
    # per sample the consistency loss is the mean of (per-sample term); recover it from one-hot batches
    per_sample = []
    for i in range(5):
        rows = slice(i, i + 1)
        o = apex_loss(_model(), x0[rows], z[rows], t[rows], c[rows], m[rows],
                      APEXConfig(variant="released", w_consistency=1.0, consistency_clamp=None),
                      generator=torch.Generator().manual_seed(SEED))
        per_sample.append(o["l_consistency"])
    per_sample = torch.stack(per_sample)
    torch.testing.assert_close(per_sample.mean(), out[False]["l_consistency"], rtol=1e-10, atol=0)
    weights = torch.tensor([math.tan((1 - ti) * math.pi / 2.5) + 1 for ti in t.tolist()], dtype=t.dtype)
    torch.testing.assert_close(out[True]["l_consistency"], (weights * per_sample).mean(), rtol=1e-10, atol=0)


# ---- direct and two-phase forms agree ------------------------------------------------------

@pytest.mark.parametrize("fields", OPTION_CASES + [dict(APEXConfig.preset("release", cfg_scale=0.0).__dict__)],
                         ids=lambda f: "preset-no-cfg" if "variant" in f else _ids(f))
@pytest.mark.parametrize("with_teacher", [False, True])
def test_two_phase_equals_the_direct_form(fields, with_teacher):
    fields = {k: v for k, v in fields.items() if k != "variant"}
    cfg = APEXConfig(variant="released", **fields)
    model = _model()
    teacher = None
    if with_teacher:
        teacher = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x0, z, t, c, m = make_batch(batch=6, seed=3)
    direct, direct_grads = _loss_and_grads(
        lambda: apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(7), teacher=teacher),
        model)
    objective = two_phase_apex(x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(7),
                               teacher=teacher is not None)
    phased, phased_grads = _loss_and_grads(lambda: run_two_phase(model, objective, teacher), model)
    assert sorted(direct) == sorted(phased) and direct["loss"] > 0
    for key in direct:
        torch.testing.assert_close(phased[key], direct[key], rtol=1e-10, atol=1e-12, msg=key)
    for name in direct_grads:
        torch.testing.assert_close(phased_grads[name], direct_grads[name], rtol=1e-9, atol=1e-12, msg=name)


# ---- every option off = today's objective ----------------------------------------------------

def todays_released(model, x0, z, t, c, m, cfg, generator):
    """The released objective as it was before these options (default fuse_forwards, no
    teacher), in the order it ran its operations: one-step jump, fused base + fake forward, fused
    DM forward, MSE terms, batch means."""
    b = released_batch(x0, z, t, c, m, cfg, generator, None)
    f_g, x_g = one_step_generation(model, b.z_g, b.c_g, b.m_g, t.dtype)
    x_g = x_g.detach()
    y = b.fresh.t_fake.reshape(-1, 1, 1, 1) * b.fresh.z_fake + (1 - b.fresh.t_fake.reshape(-1, 1, 1, 1)) * x_g
    fused = model(torch.cat([b.x_t, y]), torch.cat([b.t_b, b.fresh.t_fake]), torch.cat([b.c_b, b.c_g]),
                  context_mask=torch.cat([b.m_b, b.m_g]),
                  fake_condition=torch.cat([torch.zeros(len(b.t_b), dtype=torch.bool),
                                            torch.ones(len(b.fresh.t_fake), dtype=torch.bool)]))
    v_base, v_fake = fused[:b.x_t.shape[0]], fused[b.x_t.shape[0]:]
    with torch.no_grad():
        y2 = bt(b.fresh.t_dm, x_g) * b.fresh.z_dm + (1 - bt(b.fresh.t_dm, x_g)) * x_g
        n = y2.shape[0]
        v = model(torch.cat([y2, y2]), torch.cat([b.fresh.t_dm, b.fresh.t_dm]), torch.cat([b.c_g, b.c_g]),
                  context_mask=torch.cat([b.m_g, b.m_g]),
                  fake_condition=torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]))
        g = v[:n] - v[n:]
        if cfg.dm_normalize:
            g = g / bt(g.pow(2).flatten(1).mean(dim=1).sqrt().clamp_min(1e-12), g)
        if cfg.dm_clamp is not None:
            g = g.clamp(-cfg.dm_clamp, cfg.dm_clamp)
    l_base = per_sample_mse(v_base, b.base_target).mean()
    l_fake = fake_flow_term(v_fake, x_g, b.fresh.z_fake).mean()
    l_dm = per_sample_mse(f_g, f_g.detach().to(g.dtype) - g).mean()
    return {"loss": cfg.w_base * l_base + cfg.w_fake * l_fake + cfg.w_dm * l_dm, "l_base": l_base,
            "l_fake": l_fake, "l_dm": l_dm}


@pytest.mark.parametrize("fields", [dict(), dict(w_dm=1.0, dm_clamp=None), dict(dm_normalize=True)], ids=_ids)
def test_options_off_are_bit_identical_to_todays_objective(fields):
    cfg = APEXConfig(variant="released", **fields)
    for name in NEW_FIELDS:  # the new fields really are at their off values
        assert getattr(cfg, name) == {f.name: f.default for f in dataclasses.fields(APEXConfig)}[name]
    model = _model()
    x0, z, t, c, m = make_batch(batch=5)
    got, got_grads = _loss_and_grads(
        lambda: apex_loss(model, x0, z, t, c, m, cfg, generator=torch.Generator().manual_seed(SEED)), model)
    want, want_grads = _loss_and_grads(
        lambda: todays_released(model, x0, z, t, c, m, cfg, torch.Generator().manual_seed(SEED)), model)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name


# ---- configuration and the preset ------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    (dict(variant="paper", fake_time_flag=True), "APEXConfig.fake_time_flag only acts in variant 'released'"),
    (dict(variant="paper", loss="pseudo_huber"), "APEXConfig.loss only acts in variant 'released'"),
    (dict(variant="paper", tan_weight=True), "APEXConfig.tan_weight only acts in variant 'released'"),
    (dict(variant="released", loss="l1"), "APEXConfig.loss must be one of"),
    (dict(variant="released", loss="pseudo_huber", huber_c=0.0), "APEXConfig.huber_c must be > 0"),
    (dict(variant="released", huber_c=0.01), "APEXConfig.huber_c only acts with loss='pseudo_huber'"),
    (dict(variant="released", loss="pseudo_huber", dm_normalize=True), "APEXConfig.dm_normalize and loss="),
    (dict(variant="released", fake_time_flag=1), "APEXConfig.fake_time_flag must be a bool"),
])
def test_bad_option_values_are_refused(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        APEXConfig(**fields)


def docs_preset_table():
    """{field: value} from the `preset sets` column of docs/apex_method.md's release table."""
    text = (REPO / "docs" / "apex_method.md").read_text()
    section = text.split("### The `release` preset", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [h.strip() for h in rows[0].strip("|").split("|")]
    column = header.index("preset sets")
    fields = {}
    for row in rows[2:]:
        cell = [x.strip() for x in row.strip("|").split("|")][column]
        for name, value in re.findall(r"`(\w+)=([^`]+)`", cell):
            fields[name] = {"True": True, "False": False}.get(value, value)
            if isinstance(fields[name], str) and re.fullmatch(r"[-+.\deE]+", value):
                fields[name] = float(value)
            elif isinstance(fields[name], str):
                fields[name] = value.strip("'\"")
    return fields


def test_the_preset_sets_exactly_what_the_docs_table_says():
    from megatron_apex.objectives.apex import preset_fields
    from megatron_apex.training.arguments import parse_args

    table = docs_preset_table()
    assert table == preset_fields("release")
    cfg = APEXConfig.preset("release")
    for name, value in table.items():
        assert getattr(cfg, name) == value, name
    # the flag fills what the command line leaves open, and the command line wins
    assert parse_args(["--apex-preset", "release"]).objective.apex == table
    given = parse_args(["--apex-preset", "release", "--apex-option", "w_dm=1.0", "--apex-option", "cfg_scale=0"])
    assert given.objective.apex == {**table, "w_dm": 1.0, "cfg_scale": 0}


@pytest.mark.parametrize("argv, words", [
    (["--apex-preset", "release", "--apex-variant", "paper"], "--apex-variant paper contradicts --apex-preset release"),
    (["--apex-preset", "release", "--apex-schedule", "two-phase"],
     "--apex-preset release sets cfg_scale=0.8 (a CFG-enhanced target), which cannot run with --apex-schedule "
     "two-phase; add --apex-option cfg_scale=0"),
    (["--apex-preset", "release", "--lam", "0.3"],
     "--lam acts only in --apex-variant paper, but this run uses --apex-preset release (--apex-variant released)"),
])
def test_preset_contradictions_are_refused(argv, words):
    from megatron_apex.training.arguments import parse_args

    with pytest.raises(ValueError, match=re.escape(words)):
        parse_args(argv)
    fixed = {"--apex-variant": ["--apex-preset", "release", "--apex-variant", "released"],
             "--apex-schedule": argv + ["--apex-option", "cfg_scale=0"],
             "--lam": ["--apex-preset", "release"]}[argv[2]]
    parse_args(fixed)
