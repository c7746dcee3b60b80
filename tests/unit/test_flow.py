"""OT path, endpoint predictor, weightings, reduction and time samplers against hand formulas."""

import math

import pytest
import torch

from megatron_apex.objectives.flow import (TimeSamplerConfig, endpoint, interpolate, mix_weight,
                                           per_sample_mse, sample_time, velocity_target)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (3, 7), (3, 2, 3, 4, 5)])
def test_interpolate_velocity_endpoint_match_hand_formulas(shape):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = interpolate(x, z, t)
    for i in range(shape[0]):
        ti = float(t[i])
        torch.testing.assert_close(x_t[i], ti * z[i] + (1 - ti) * x[i])
    torch.testing.assert_close(x_t[0], x[0])  # t = 0 is data
    torch.testing.assert_close(x_t[2], z[2])  # t = 1 is noise
    v = velocity_target(x, z)
    torch.testing.assert_close(v, z - x)
    # the exact velocity carries every path point back to its data point (Eq. 10)
    torch.testing.assert_close(endpoint(v, x_t, t), x)
    F = torch.randn(shape, generator=g)
    for i in range(shape[0]):
        torch.testing.assert_close(endpoint(F, x_t, t)[i], x_t[i] - float(t[i]) * F[i])


def test_bad_time_shape_raises():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="t must have shape"):
        interpolate(x, x, torch.zeros(2))


def test_per_sample_mse_is_mean_over_non_batch_elements():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 2, 3, 5, generator=g), torch.randn(4, 2, 3, 5, generator=g)
    got = per_sample_mse(a, b)
    want = torch.stack([sum(((a[i] - b[i]).flatten()[k]) ** 2 for k in range(30)) / 30 for i in range(4)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="shapes differ"):
        per_sample_mse(a, b[:, :1])


def test_per_sample_mse_reduces_low_precision_in_float32():
    a = torch.full((2, 1000), 1.0, dtype=torch.bfloat16)
    b = torch.zeros_like(a)
    out = per_sample_mse(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(2))


def test_mix_weights_against_hand_computation():
    t = torch.tensor([1e-6, 0.1, 0.5, 1.0], dtype=torch.float64)
    eps = 1e-4
    paper = [(1 - ti) / max(ti, eps) for ti in t.tolist()]
    velocity = [1 / max(ti, eps) ** 2 for ti in t.tolist()]
    torch.testing.assert_close(mix_weight(t, "paper"), torch.tensor(paper, dtype=torch.float64))
    torch.testing.assert_close(mix_weight(t, "endpoint"), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(mix_weight(t, "velocity"), torch.tensor(velocity, dtype=torch.float64))
    assert mix_weight(t, "paper")[-1] == 0  # the paper's weight vanishes at t = 1
    with pytest.raises(ValueError, match="weighting 'bogus'"):
        mix_weight(t, "bogus")


def test_uniform_sampler_range_mean_and_reproducibility():
    cfg = TimeSamplerConfig(kind="uniform", t_min=0.2)
    t = sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert float(t.min()) >= 0.2 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.6) < 0.01  # mean of U[0.2, 1]
    again = sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    other = sample_time(20000, cfg, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t, again)
    assert not torch.equal(t, other)


def test_logit_normal_sampler_quantiles():
    cfg = TimeSamplerConfig(kind="logit_normal", t_min=1e-3, logit_mean=0.5, logit_std=0.8)
    t = sample_time(40000, cfg, generator=torch.Generator().manual_seed(0))
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    for q, zq in ((0.5, 0.0), (0.1587, -1.0), (0.8413, 1.0)):  # standard normal quantiles
        assert abs(float(torch.quantile(t, q)) - sigmoid(0.5 + 0.8 * zq)) < 0.01


def test_frac_at_one():
    cfg = TimeSamplerConfig(kind="uniform", frac_at_one=0.25)
    t = sample_time(20000, cfg, generator=torch.Generator().manual_seed(3))
    assert abs(float((t == 1.0).float().mean()) - 0.25) < 0.015
    none = sample_time(20000, TimeSamplerConfig(), generator=torch.Generator().manual_seed(3))
    assert float((none == 1.0).float().mean()) < 1e-3


@pytest.mark.parametrize("field,value", [("kind", "beta"), ("t_min", 1.0), ("t_min", -0.1), ("logit_std", 0.0),
                                         ("frac_at_one", 1.5)])
def test_bad_time_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"TimeSamplerConfig.{field}"):
        TimeSamplerConfig(**{field: value})
