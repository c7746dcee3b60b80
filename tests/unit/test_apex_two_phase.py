"""The two-phase decomposition of APEX (no-grad rounds, then one batched training pass: what a
pipeline-parallel step runs) against apex_loss run directly: same terms, same gradients."""

import copy

import pytest
import torch

from _toy_models import ToyVelocityModel, make_batch
from megatron_apex.objectives.apex import (APEXConfig, ModelQuery, apex_loss, batch_queries, run_two_phase,
                                           split_output, two_phase_apex)

CASES = [
    dict(variant="paper"),
    dict(variant="paper", lam=0.0),
    dict(variant="paper", lambda_p=0.0, weighting="velocity"),
    dict(variant="released"),
    dict(variant="released", fuse_forwards=False, dm_normalize=True, dm_clamp=None),
    dict(variant="released", batch_split=0.5, w_fake=0.0),
    dict(variant="released", w_dm=0.0),
]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _both(fields, with_teacher=False, step=None, seed=3):
    cfg = APEXConfig(**fields)
    model = ToyVelocityModel(seed=1, learnable=True).double()
    teacher = copy.deepcopy(model).requires_grad_(False) if with_teacher else None
    with torch.no_grad():  # the teacher must differ from the model for the test to see it
        if teacher is not None:
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x0, noise, t, context, mask = make_batch(batch=6, seed=seed)

    direct = apex_loss(model, x0, noise, t, context, mask, cfg, generator=torch.Generator().manual_seed(7),
                       teacher=teacher, step=step)
    direct["loss"].backward()
    direct_grads = _grads(model)
    model.zero_grad()

    objective = two_phase_apex(x0, noise, t, context, mask, cfg, generator=torch.Generator().manual_seed(7),
                               teacher=teacher is not None, step=step)
    phased = run_two_phase(model, objective, teacher)
    phased["loss"].backward()
    return direct, direct_grads, phased, _grads(model)


@pytest.mark.parametrize("fields", CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("with_teacher", [False, True])
def test_two_phase_equals_the_direct_objective(fields, with_teacher):
    direct, direct_grads, phased, phased_grads = _both(fields, with_teacher)
    assert sorted(direct) == sorted(phased)
    assert direct["loss"].item() > 0
    for key in direct:
        torch.testing.assert_close(phased[key], direct[key], rtol=1e-10, atol=1e-12, msg=key)
    assert sorted(direct_grads) == sorted(phased_grads)
    for name in direct_grads:
        torch.testing.assert_close(phased_grads[name], direct_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_dm_warmup_is_honoured():
    fields = dict(variant="released", dm_warmup_steps=5)
    for step, dm_on in ((2, False), (5, True)):
        direct, _, phased, _ = _both(fields, step=step)
        assert (phased["l_dm"].item() > 0) == dm_on
        torch.testing.assert_close(phased["loss"], direct["loss"], rtol=1e-10, atol=1e-12)


def test_rounds_follow_the_terms_that_are_on():
    x0, noise, t, context, mask = make_batch(batch=4)
    rounds = {}
    for name, fields in {"paper": {}, "paper fm only": dict(lam=0.0, lambda_p=0.0),
                         "released": {}, "released no dm": dict(w_dm=0.0),
                         "released base only": dict(w_dm=0.0, w_fake=0.0)}.items():
        variant = name.split()[0]
        objective = two_phase_apex(x0, noise, t, context, mask, APEXConfig(variant=variant, **fields),
                                   generator=torch.Generator().manual_seed(0))
        rounds[name] = (objective.num_rounds, [q.rows for q in objective.train_queries()] if
                        objective.num_rounds == 0 else None)
    assert {k: v[0] for k, v in rounds.items()} == {"paper": 1, "paper fm only": 0, "released": 2,
                                                      "released no dm": 1, "released base only": 0}
    assert rounds["paper fm only"][1] == [4] and rounds["released base only"][1] == [4]


def test_what_two_phase_cannot_run_is_refused():
    x0, noise, t, context, mask = make_batch(batch=4)
    with pytest.raises(ValueError, match="fake_grad"):
        two_phase_apex(x0, noise, t, context, mask, APEXConfig(variant="paper", fake_grad="through"))
    for field in (dict(cfg_scale=0.8), dict(w_consistency=1.0)):
        with pytest.raises(ValueError, match=next(iter(field))):
            two_phase_apex(x0, noise, t, context, mask, APEXConfig(variant="released", **field))


def test_batch_queries_round_trip():
    x0, noise, t, context, mask = make_batch(batch=3)
    queries = [ModelQuery(x0, t, context, mask), ModelQuery(noise[:2], t[:2], context[:2], mask[:2],
                                                            fake_condition=True, t_target=torch.zeros(2).double())]
    batched = batch_queries(queries)
    assert batched.fake_condition.tolist() == [False] * 3 + [True] * 2
    assert batched.t_target.tolist() == t.tolist() + [0.0, 0.0]
    model = ToyVelocityModel(seed=2).double()
    pieces = split_output(model(batched.x_t, batched.t, batched.context, batched.context_mask,
                                fake_condition=batched.fake_condition, t_target=batched.t_target), queries)
    torch.testing.assert_close(pieces[0], model(x0, t, context, mask))
    torch.testing.assert_close(pieces[1], model(noise[:2], t[:2], context[:2], mask[:2], fake_condition=True,
                                                t_target=torch.zeros(2).double()))
    with pytest.raises(ValueError, match="context_mask"):
        batch_queries([ModelQuery(x0, t, context, mask), ModelQuery(x0, t, context, None)])
