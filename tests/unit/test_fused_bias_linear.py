"""The bias-fused linears equal megatron-core's own ColumnParallelLinear/RowParallelLinear
(values and gradients), take the one-call path when they may, and megatron's path otherwise."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def _config():
    from megatron_apex.families import get_model_config

    return get_model_config("qwen-image-tiny-test").to_transformer_config()


def _pair(fused_cls, base_cls, **kwargs):
    torch.manual_seed(0)
    kw = dict(config=_config(), init_method=torch.nn.init.normal_, bias=True, **kwargs)
    fused = fused_cls(12, 20, **kw)
    base = base_cls(12, 20, **kw)
    base.load_state_dict(fused.state_dict())
    with torch.no_grad():
        fused.bias.normal_()
        base.bias.copy_(fused.bias)
    return fused, base


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    out, bias = layer(x)
    full = out if bias is None else out + bias
    (full * torch.linspace(-1, 1, full.shape[-1])).sum().backward()
    return full, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_equals_megatron_core(kind, skip_bias_add):
    if kind == "column":
        fused, base = _pair(FusedBiasColumnParallelLinear, ColumnParallelLinear, gather_output=False,
                            skip_bias_add=skip_bias_add)
    else:
        fused, base = _pair(FusedBiasRowParallelLinear, RowParallelLinear, input_is_parallel=True,
                            skip_bias_add=skip_bias_add)
    x = torch.randn(3, 5, 12)
    for got, want in zip(_run(fused, x), _run(base, x)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_bias_is_added_inside_the_matmul(kind, monkeypatch):
    """The point of the classes: no separate pass through megatron's linear function."""
    if kind == "column":
        fused, _ = _pair(FusedBiasColumnParallelLinear, ColumnParallelLinear, gather_output=False)
        skipping, _ = _pair(FusedBiasColumnParallelLinear, ColumnParallelLinear, gather_output=False,
                            skip_bias_add=True)
    else:
        fused, _ = _pair(FusedBiasRowParallelLinear, RowParallelLinear, input_is_parallel=True,
                         skip_bias_add=False)
        skipping, _ = _pair(FusedBiasRowParallelLinear, RowParallelLinear, input_is_parallel=True,
                            skip_bias_add=True)
    calls = []
    for layer in (fused, skipping):
        original = layer._forward_impl
        layer._forward_impl = lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k)
    fused(torch.randn(2, 12))
    assert calls == []
    skipping(torch.randn(2, 12))  # skip_bias_add: the caller adds the bias, megatron's path
    assert calls == [1]
