"""megatron_apex.inference.samplers against hand-written loops of the samplers in docs/apex_method.md (Sampling)."""

import pytest
import torch
from _toy_models import ToyVelocityModel, make_batch

from megatron_apex.inference.samplers import sample, sample_seeded

SHAPE = (2, 3, 3)


def _model():
    return ToyVelocityModel(SHAPE, seed=3).double().eval()


@torch.no_grad()
def test_one_step_flow_map_is_noise_minus_the_jump_from_1_to_0():
    model = _model()
    _, z, _, c, m = make_batch(4, SHAPE)
    ones, zeros = torch.ones(4, dtype=z.dtype), torch.zeros(4, dtype=z.dtype)
    torch.testing.assert_close(sample(model, z, c, m, nfe=1), z - model(z, ones, c, m, t_target=zeros))


@torch.no_grad()
@pytest.mark.parametrize("method", ["euler", "flowmap"])
def test_k_steps_follow_the_uniform_grid(method):
    model = _model()
    _, z, _, c, m = make_batch(4, SHAPE)
    x, k = z.clone(), 3
    for i in range(k):
        t, t_next = 1 - i / k, 1 - (i + 1) / k
        tt = torch.full((4,), t_next, dtype=z.dtype) if method == "flowmap" else None
        x = x - (t - t_next) * model(x, torch.full((4,), t, dtype=z.dtype), c, m, t_target=tt)
    torch.testing.assert_close(sample(model, z, c, m, nfe=k, method=method), x)


@torch.no_grad()
def test_renoise_predicts_the_endpoint_then_renoises_with_fresh_noise():
    model = _model()
    _, z, _, c, m = make_batch(4, SHAPE)
    gen, x = torch.Generator().manual_seed(5), z.clone()
    for t, t_next in ((1.0, 0.5), (0.5, 0.0)):
        x0 = x - t * model(x, torch.full((4,), t, dtype=z.dtype), c, m)
        x = x0 if t_next == 0 else t_next * torch.randn(x.shape, generator=gen, dtype=x.dtype) + (1 - t_next) * x0
    got = sample(model, z, c, m, nfe=2, method="renoise", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, x)


@torch.no_grad()
def test_sample_seeded_draws_all_noise_first_and_batching_does_not_change_it():
    model = _model().float()
    _, _, _, c, m = make_batch(7, SHAPE, dtype=torch.float32)
    z = torch.randn((7, *SHAPE), generator=torch.Generator().manual_seed(11))
    whole = sample(model, z, c, m, nfe=2, method="euler")
    torch.testing.assert_close(sample_seeded(model, c, m, SHAPE, nfe=2, method="euler", seed=11, batch_size=3), whole)
    torch.testing.assert_close(sample_seeded(model, c, m, SHAPE, nfe=2, method="euler", seed=11), whole)
    assert not torch.allclose(sample_seeded(model, c, m, SHAPE, nfe=2, method="euler", seed=12), whole)


@torch.no_grad()
@pytest.mark.parametrize("nfe, times", [(2, (0.999, 0.6, 0.0)), (4, (0.999, 0.999 - 0.499 / 3, 0.999 - 0.998 / 3, 0.5, 0.0))])
def test_release_jumps_to_the_data_then_renoises_on_the_authors_grid(nfe, times):
    model = _model()
    _, z, _, c, m = make_batch(4, SHAPE)
    gen, x, zeros = torch.Generator().manual_seed(7), z.clone(), torch.zeros(4, dtype=z.dtype)
    for i in range(nfe):
        t, t_next = times[i], times[i + 1]
        x0 = x - t * model(x, torch.full((4,), t, dtype=z.dtype), c, m, t_target=zeros)
        x = x0 if t_next == 0 else t_next * torch.randn(x.shape, generator=gen, dtype=x.dtype) + (1 - t_next) * x0
    got = sample(model, z, c, m, nfe=nfe, method="release", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, x)
    # the jump is the trained one (tt = 0), not the velocity head's (tt = t): renoise on the same grid differs
    assert not torch.allclose(got, sample(model, z, c, m, nfe=nfe, method="renoise",
                                          generator=torch.Generator().manual_seed(7)))
