"""ConditionShift (Eq. 9, c_fake = A c + b) and its per-sample application."""

import pytest
import torch

from megatron_apex.models.common.condition_shift import ConditionShift, apply_condition_shift


def _context(seed=0, batch=4, length=3, dim=5):
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize("a,b", [(-1.0, 0.0), (-0.5, 1.0), (0.5, 10.0)])
def test_every_kind_starts_at_a_c_plus_b(kind, a, b):
    c = _context()
    shift = ConditionShift(5, kind=kind, a=a, b=b).double()
    torch.testing.assert_close(shift(c), a * c + b)


def test_learnable_kinds_receive_gradients_and_fixed_scalar_has_none():
    c = _context()
    fixed = ConditionShift(5)  # scalar, fixed by default
    assert list(fixed.parameters()) == []
    assert fixed.state_dict() == {}  # config values, not checkpoint state

    for kind, learnable in (("scalar", True), ("diagonal", None), ("full", None)):
        shift = ConditionShift(5, kind=kind, a=-0.5, b=1.0, learnable=learnable).double()
        names = {n for n, _ in shift.named_parameters()}
        assert names == {"A", "b"}
        assert set(shift.state_dict()) == {"A", "b"}
        weights = torch.randn(c.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (shift(c) * weights).sum().backward()
        # hand gradients of sum(w * (A c + b))
        if kind == "full":
            want_A = torch.einsum("...i,...j->ij", weights, c)
        elif kind == "diagonal":
            want_A = (weights * c).flatten(0, -2).sum(0)
        else:
            want_A = (weights * c).sum().reshape(1)
        want_b = weights.flatten(0, -2).sum(0) if kind != "scalar" else weights.sum().reshape(1)
        torch.testing.assert_close(shift.A.grad, want_A)
        torch.testing.assert_close(shift.b.grad, want_b)


def test_full_kind_is_a_matrix_product():
    c = _context()
    shift = ConditionShift(5, kind="full").double()
    with torch.no_grad():
        shift.A.copy_(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
        shift.b.copy_(torch.arange(5, dtype=torch.float64))
    want = torch.einsum("ij,blj->bli", shift.A, c) + shift.b
    torch.testing.assert_close(shift(c), want)


def test_bool_fake_condition_shifts_everything_or_nothing():
    c = _context()
    shift = ConditionShift(5, a=-0.5, b=1.0).double()
    torch.testing.assert_close(apply_condition_shift(shift, c, True), -0.5 * c + 1.0)
    assert apply_condition_shift(shift, c, False) is c
    torch.testing.assert_close(apply_condition_shift(shift, c, torch.tensor(True)), -0.5 * c + 1.0)


def test_per_sample_fake_condition_shifts_only_selected_rows_differentiably():
    c = _context().requires_grad_(True)
    shift = ConditionShift(5, kind="diagonal", a=-0.5, b=1.0).double()
    rows = torch.tensor([True, False, False, True])
    out = apply_condition_shift(shift, c, rows)
    for i in range(4):
        want = -0.5 * c[i] + 1.0 if rows[i] else c[i]
        torch.testing.assert_close(out[i], want)
    out.sum().backward()
    for i in range(4):  # d out / d c: the shift's scale on selected rows, identity elsewhere
        torch.testing.assert_close(c.grad[i], torch.full_like(c[i], -0.5 if rows[i] else 1.0))
    # only the selected rows feed the shift's parameters
    torch.testing.assert_close(shift.b.grad, torch.full((5,), 2.0 * 3, dtype=torch.float64))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="kind 'bogus'"):
        ConditionShift(5, kind="bogus")
    with pytest.raises(ValueError, match="dim must be >= 1"):
        ConditionShift(0)
    shift = ConditionShift(5)
    with pytest.raises(ValueError, match="last dimension is 4"):
        shift(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        apply_condition_shift(shift, torch.zeros(4, 3, 5), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="must be bool"):
        apply_condition_shift(shift, torch.zeros(4, 3, 5), torch.ones(4))
    with pytest.raises(ValueError, match="no ConditionShift"):
        apply_condition_shift(None, torch.zeros(4, 3, 5), True)
