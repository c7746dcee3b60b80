"""The forward's CPU fast paths compute what the plain expressions compute: one-pass modulation
and gated residuals, the RoPE rotations built once per shape, the column linear without
megatron's identity mappings at TP=1, and no-grad queries without the (zero) target-time term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_apex.models.common import linear as linear_module
from megatron_apex.models.common.modulation import gated_residual, modulate
from megatron_apex.models.common.rope import _rotations, apply_rope, qwen_image_rope_angles


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).float().requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("fast,plain,shapes", [
    (modulate, lambda x, shift, scale: x * (1 + scale) + shift, ((7, 3, 5), (1, 3, 5), (1, 3, 5))),
    (gated_residual, lambda x, gate, update: x + gate * update, ((7, 3, 5), (1, 3, 5), (7, 3, 5))),
])
def test_one_pass_elementwise_equals_the_two_op_expression(fast, plain, shapes):
    """Values and gradients, with the broadcasting the blocks use ([s, b, d] and (1, b, d))."""
    results = []
    for f in (fast, plain):
        leaves = _leaves(*shapes)
        out = f(*leaves)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        results.append((out, *torch.autograd.grad((out * weights).sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rope_rotations_are_built_once_per_shape_and_equal_a_fresh_build():
    first = qwen_image_rope_angles(3, 5, 4, (4, 6, 6), 10000.0)
    again = qwen_image_rope_angles(3, 5, 4, [4, 6, 6], 10000)
    assert all(a is b for a, b in zip(first, again))  # the cached tensors themselves
    fresh = _rotations(3, 5, 4, (4, 6, 6), 10000.0, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first, fresh))
    other = qwen_image_rope_angles(3, 5, 6, (4, 6, 6), 10000.0)
    assert other[0].shape == (6, 8) and other[1] is not first[1]
    # rotation of text token k = exp(i * (max(h//2, w//2) + k) * theta^(-2j/d)) per axis
    k, j = 2, 1
    angle = (max(3 // 2, 5 // 2) + k) * 10000.0 ** (-2 * j / 4)
    torch.testing.assert_close(first[0][k, j], torch.polar(torch.tensor(1.0), torch.tensor(angle)))


def test_rope_rotations_first_built_under_inference_mode_serve_a_training_forward():
    with torch.inference_mode():
        text, image = qwen_image_rope_angles(2, 2, 3, (2, 2, 4), 500.0)
    assert not text.is_inference() and not image.is_inference()
    x = torch.randn(4, 2, 1, 8, requires_grad=True)
    apply_rope(x, image).sum().backward()  # saving an inference tensor for backward would raise
    assert x.grad is not None


def test_column_linear_at_tp1_skips_megatrons_identity_mappings(monkeypatch):
    from megatron_apex.families import get_model_config

    def refuse(*args, **kwargs):
        raise AssertionError("megatron's mapping was called at TP=1")

    config = get_model_config("qwen-image-tiny-test").to_transformer_config()
    torch.manual_seed(0)
    layer = linear_module.FusedBiasColumnParallelLinear(6, 10, config=config, init_method=torch.nn.init.normal_,
                                                        bias=True, gather_output=True)
    monkeypatch.setattr(linear_module, "copy_to_tensor_model_parallel_region", refuse)
    monkeypatch.setattr(linear_module, "gather_from_tensor_model_parallel_region", refuse)
    x = torch.randn(2, 3, 6, requires_grad=True)
    out, bias = layer(x)
    assert bias is None
    torch.testing.assert_close(out, x @ layer.weight.t() + layer.bias, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 3, 6), rtol=1e-6, atol=1e-6)


def test_no_grad_query_without_target_time_skips_the_zero_term():
    from megatron_apex.families import build_model, get_model_config

    config = get_model_config("qwen-image-tiny-test", target_time_init="copy")
    torch.manual_seed(0)
    model = build_model(config).eval()
    calls = []
    model.target_time_embedder.register_forward_hook(lambda *a: calls.append(1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.out_channels, 8, 8, generator=gen)
    t = torch.rand(2, generator=gen)
    ctx = torch.randn(2, 3, config.joint_attention_dim, generator=gen)
    with torch.no_grad():
        skipped = model(x, t, ctx)
    assert calls == []
    computed = model(x, t, ctx)  # grad mode: the term is computed (its gradient is zero, not absent)
    assert calls == [1]
    assert torch.equal(skipped, computed.detach())
    with torch.no_grad():
        model(x, t, ctx, t_target=t * 0.5)
    assert calls == [1, 1]
