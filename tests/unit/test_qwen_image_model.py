"""QwenImageModel's APEX extras (condition shift, target time), stage split, errors, specs.

References are re-computations by other routes: the shift applied by hand to the input or by
a hook after txt_in, the time embedding assembled from its submodules, a single-stage run
for the two-stage split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_apex.families import build_model, count_parameters, get_model_config
from megatron_apex.models.qwen_image.config import QwenImageConfig


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def tiny(**overrides) -> QwenImageConfig:
    return get_model_config("qwen-image-tiny-test", **overrides)


def randomize(model, seed=0, skip=()):
    """Every parameter random (adaLN-Zero would otherwise make blocks the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    return model


def inputs(config, B=3, H=6, W=8, L=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.out_channels, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, config.joint_attention_dim, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    return x, t, ctx, mask


def model_for(seed=0, **overrides):
    config = tiny(**overrides)
    return config, randomize(build_model(config, backend="local").eval(), seed)


# ------------------------------------------------------------------------------ condition shift
@pytest.mark.parametrize("a,b", [(-1.0, 0.0), (-0.5, 1.0)])
def test_fake_condition_at_input_site_shifts_the_raw_context(a, b):
    config, model = model_for(shift_site="input", shift_a=a, shift_b=b)
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        fake = model(x, t, ctx, mask, fake_condition=True)
        by_hand = model(x, t, a * ctx + b, mask)
        real = model(x, t, ctx, mask)
    torch.testing.assert_close(fake, by_hand, rtol=0, atol=1e-6)
    assert (fake - real).abs().max() > 1e-3


def test_fake_condition_at_projected_site_shifts_txt_in_output():
    a, b = -0.5, 1.0
    config, model = model_for(shift_site="projected", shift_a=a, shift_b=b)
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        fake = model(x, t, ctx, mask, fake_condition=True)
        real = model(x, t, ctx, mask)
        handle = model.txt_in.register_forward_hook(lambda m, i, out: a * out + b)
        by_hand = model(x, t, ctx, mask)
        handle.remove()
    torch.testing.assert_close(fake, by_hand, rtol=0, atol=1e-6)
    assert (fake - real).abs().max() > 1e-3


def test_projected_scalar_shift_offset_b_is_invisible_to_the_model():
    """At the projected site c_fake = a*h + b adds b to every hidden unit of every text token. Each
    block reads the text stream through a LayerNorm (mean over the hidden units removed) and the
    text stream's own output is discarded, so b never reaches the image tokens: Table 7's columns
    are one column there. At the input site the text RMSNorm keeps b, so b matters."""
    def fake(site, a, b):
        config, model = model_for(shift_site=site, shift_a=a, shift_b=b)
        x, t, ctx, mask = inputs(config)
        with torch.no_grad():
            return model(x, t, ctx, mask, fake_condition=True), model(x, t, ctx, mask)

    for a in (-1.0, -0.5, 0.5):
        base, real = fake("projected", a, 0.0)
        for b in (0.1, 1.0, 10.0):
            torch.testing.assert_close(fake("projected", a, b)[0], base, rtol=0, atol=1e-4)
    assert (fake("projected", -0.5, 0.0)[0] - fake("projected", -1.0, 0.0)[0]).abs().max() > 1e-2  # a matters
    assert (fake("projected", 0.5, 0.0)[0] - real).abs().max() > 1e-2
    assert (fake("input", -1.0, 1.0)[0] - fake("input", -1.0, 0.0)[0]).abs().max() > 1e-2  # b matters here


@pytest.mark.parametrize("site", ["input", "projected"])
def test_per_sample_fake_condition_changes_only_selected_rows(site):
    config, model = model_for(shift_site=site)
    x, t, ctx, mask = inputs(config, B=4)
    rows = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = model(x, t, ctx, mask, fake_condition=rows)
        real = model(x, t, ctx, mask)
        fake = model(x, t, ctx, mask, fake_condition=True)
    torch.testing.assert_close(mixed[~rows], real[~rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[rows], fake[rows], rtol=0, atol=1e-6)
    assert (mixed[rows] - real[rows]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_fake_condition_with_wrong_batch_is_rejected():
    config, model = model_for()
    x, t, ctx, mask = inputs(config, B=3)
    with pytest.raises(ValueError, match="fake_condition"):
        model(x, t, ctx, mask, fake_condition=torch.tensor([True, False]))


# ------------------------------------------------------------------------------ target time
def test_t_target_none_equals_t_target_t_exactly():
    config, model = model_for(target_time_init="copy")
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, mask), model(x, t, ctx, mask, t_target=t.clone()))


def test_time_embedding_is_emb1_t_plus_emb2_tt_times_t_minus_tt():
    config, model = model_for(target_time_init="copy")
    x, t, ctx, mask = inputs(config)
    tt = t * 0.3
    seen = {}
    handle = model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(silu_temb=args[2]))
    with torch.no_grad():
        model(x, t, ctx, mask, t_target=tt)
        handle.remove()
        from megatron_apex.models.common.timestep import sinusoidal_timestep_features as feats

        def emb(embedder, s):
            return embedder.linear_2(F.silu(embedder.linear_1(feats(s))))

        expected = emb(model.time_embedder, t) + emb(model.target_time_embedder, tt) * (t - tt)[:, None]
    torch.testing.assert_close(seen["silu_temb"], F.silu(expected), rtol=0, atol=1e-6)


def test_sinusoid_is_cos_then_sin_of_1000_t():
    from megatron_apex.models.common.timestep import sinusoidal_timestep_features

    t = torch.tensor([0.0, 0.25, 1.0])
    f = sinusoidal_timestep_features(t, 8)
    freqs = torch.tensor([10000.0 ** (-j / 4) for j in range(4)])
    angles = 1000 * t[:, None] * freqs[None]
    torch.testing.assert_close(f, torch.cat([angles.cos(), angles.sin()], dim=1))


def test_t_target_changes_the_output_when_the_embedder_exists():
    config, model = model_for(target_time_init="copy")
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        assert (model(x, t, ctx, mask, t_target=torch.zeros_like(t)) - model(x, t, ctx, mask)).abs().max() > 1e-3


def test_t_target_without_the_embedder_raises_unless_equal_to_t():
    config, model = model_for(target_time_embedder=False)
    x, t, ctx, mask = inputs(config)
    assert not hasattr(model, "target_time_embedder")
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, mask, t_target=t.clone()), model(x, t, ctx, mask))
        with pytest.raises(ValueError, match="target-time-embedder"):
            model(x, t, ctx, mask, t_target=torch.zeros_like(t))


def test_zero_initialised_target_embedder_ignores_t_target():
    config = tiny(target_time_init="zero")
    model = build_model(config, backend="local").eval()
    assert torch.count_nonzero(model.target_time_embedder.linear_2.weight) == 0
    randomize(model, skip=("target_time_embedder.linear_2",))
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        a = model(x, t, ctx, mask, t_target=torch.zeros_like(t))
        b = model(x, t, ctx, mask, t_target=t * 0.5)
        c = model(x, t, ctx, mask)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.abs().max() > 1e-3


def test_copy_initialised_target_embedder_starts_as_the_first():
    model = build_model(tiny(target_time_init="copy"), backend="local")
    first, second = model.time_embedder.state_dict(), model.target_time_embedder.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.count_nonzero(first["linear_2.weight"]) > 0


# ------------------------------------------------------------------------------ training signal
def test_gradients_reach_every_parameter():
    """With fake rows (learnable full shift) and t_target != t every parameter gets a gradient,
    except the documented dead ends: the last block's text stream output is discarded (as in
    diffusers), so its text-query norm, text output projection and text MLP get none."""
    config, model = model_for(shift_kind="full", target_time_init="copy")
    model.train()
    x, t, ctx, mask = inputs(config, B=4)
    out = model(x, t, ctx, mask, fake_condition=torch.tensor([True, False, True, False]), t_target=t * 0.5)
    out.square().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert "condition_shift.A" in names and "target_time_embedder.linear_1.weight" in names
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0}
    last = f"layers.{config.num_layers - 1}."
    dead = {last + "attention.added_q_layernorm.weight"}
    dead |= {last + f"attention.linear_added_proj.{p}" for p in ("weight", "bias")}
    dead |= {last + f"txt_mlp.linear_fc{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    assert no_grad == dead


def test_dit_init_starts_at_zero_output_and_identity_blocks():
    """adaLN-Zero: modulations and proj_out start at 0, so the velocity starts at exactly 0."""
    config = tiny()
    model = build_model(config, backend="local")
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, ctx, mask)) == 0
    assert torch.count_nonzero(model.layers[0].img_modulation.linear.weight) == 0
    w = model.layers[0].attention.linear_qkv.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


# ------------------------------------------------------------------------------ pipeline boundary
def test_two_stage_split_equals_single_stage():
    config, full = model_for(num_layers=3, target_time_init="copy")
    sd = full.state_dict()
    from megatron_apex.models.qwen_image.model import QwenImageModel
    from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec

    spec = get_qwen_image_layer_spec("local")
    first = QwenImageModel(config, spec, pre_process=True, post_process=False, layer_range=(0, 2)).eval()
    last = QwenImageModel(config, spec, pre_process=False, post_process=True, layer_range=(2, 3)).eval()

    def stage_sd(model):
        own = model.state_dict().keys()
        out = {}
        for key in own:
            src = key
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                src = f"layers.{int(i) + model.layer_offset}.{rest}"
            out[key] = sd[src]
        return out

    first.load_state_dict(stage_sd(first))
    last.load_state_dict(stage_sd(last))
    x, t, ctx, mask = inputs(config)
    with torch.no_grad():
        boundary = first(x, t, ctx, mask, fake_condition=True, t_target=t * 0.5)
        assert boundary.shape == first.stage_tensor_shape(3, ctx.shape[1], x.shape[2], x.shape[3])
        last.set_input_tensor([boundary])
        split = last(x, t, ctx, mask)
        whole = full(x, t, ctx, mask, fake_condition=True, t_target=t * 0.5)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    assert set(last.sharded_state_dict().keys()) >= {"layers.2.attention.linear_qkv.weight", "proj_out.weight"}


def test_sharded_state_dict_covers_the_state_dict():
    config, model = model_for()
    keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    sharded = {k for k in model.sharded_state_dict() if not k.endswith("_extra_state")}
    assert sharded == keys


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("change,item", [
    (lambda x, t, c, m: (x[0], t, c, m), "x_t"),
    (lambda x, t, c, m: (x.repeat(1, 2, 1, 1), t, c, m), "--out-channels"),
    (lambda x, t, c, m: (x[..., :5], t, c, m), "--patch-size"),
    (lambda x, t, c, m: (x, t[:2], c, m), "t must"),
    (lambda x, t, c, m: (x, t, c[..., :5], m), "--joint-attention-dim"),
    (lambda x, t, c, m: (x, t, c[:2], m), "context"),
    (lambda x, t, c, m: (x, t, c, m[:, :2]), "context_mask"),
])
def test_bad_inputs_name_the_item(change, item):
    config, model = model_for()
    args = change(*inputs(config))
    with pytest.raises(ValueError, match=item):
        model(*args)


def test_bad_t_target_shape_is_named():
    config, model = model_for()
    x, t, ctx, mask = inputs(config)
    with pytest.raises(ValueError, match="t_target"):
        model(x, t, ctx, mask, t_target=torch.zeros(7))


@pytest.mark.parametrize("overrides,flag", [
    (dict(axes_dims_rope=(4, 6, 8)), "--axes-dims-rope"),
    (dict(axes_dims_rope=(3, 7, 6)), "--axes-dims-rope"),
    (dict(in_channels=5), "--in-channels"),
    (dict(shift_site="middle"), "--shift-site"),
    (dict(shift_kind="affine"), "--shift-kind"),
    (dict(target_time_init="random"), "--target-time-init"),
    (dict(num_layers=0), "--num-layers"),
    (dict(params_dtype="fp8"), "--params-dtype"),
])
def test_bad_configs_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        tiny(**overrides)


def test_heads_not_divisible_by_tp_is_reported():
    with pytest.raises(ValueError) as err:
        tiny(num_attention_heads=3, axes_dims_rope=(4, 6, 6)).validate(tensor_model_parallel_size=2)
    assert str(err.value) == ("--num-attention-heads (3) must be divisible by "
                              "--tensor-model-parallel-size (2)")


def test_registry_errors_list_known_names():
    with pytest.raises(ValueError, match="qwen-image-tiny") as err:
        get_model_config("qwen-image-7b")
    assert "qwen-image-7b" in str(err.value)
    with pytest.raises(ValueError, match="num_heads"):
        get_model_config("qwen-image-tiny", num_heads=4)


def test_registry_configs_build_and_count():
    from megatron_apex.families import model_names

    for name in sorted(set(model_names()) - {"qwen-image-20b"}):
        config = get_model_config(name)
        model = build_model(config, backend="local")
        assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    tiny_cfg = get_model_config("qwen-image-tiny")
    assert (tiny_cfg.in_channels, tiny_cfg.out_channels, tiny_cfg.joint_attention_dim) == (
        tiny_cfg.patch_size ** 2, 1, 384)  # grey images, MiniLM states


# ------------------------------------------------------------------------------ specs
def test_layer_spec_backends():
    from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear
    from megatron_apex.models.common.mlp import DenseMLP
    from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec
    from megatron_apex.models.qwen_image.layers import SDPAttention
    from megatron_apex.models.specs import transformer_engine_available

    local = get_qwen_image_layer_spec("local")
    assert local.submodules.attention.submodules.core_attention is SDPAttention
    assert local.submodules.attention.submodules.linear_qkv is FusedBiasColumnParallelLinear
    assert local.submodules.mlp.module is DenseMLP
    auto = get_qwen_image_layer_spec("auto")
    assert auto.metainfo["backend"] == ("te" if transformer_engine_available() else "local")
    with pytest.raises(ValueError, match="backend"):
        get_qwen_image_layer_spec("cuda")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="transformer_engine"):
            get_qwen_image_layer_spec("te")
    else:
        te = get_qwen_image_layer_spec("te")
        assert te.submodules.attention.submodules.core_attention.__name__ == "TEDotProductAttention"


def test_non_square_and_text_lengths():
    config, model = model_for()
    for H, W, L in ((2, 10, 1), (12, 4, 9)):
        x, t, ctx, mask = inputs(config, B=2, H=H, W=W, L=L)
        with torch.no_grad():
            assert model(x, t, ctx, mask).shape == x.shape
