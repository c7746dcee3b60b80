"""Every family's model beyond diffusers parity (tests/unit/test_diffusers_parity.py): the APEX
inputs (condition shift, target time), initialisation, gradients, pipeline-stage chaining and
recompute, input and config errors, registry and layer specs.

References are re-computations by other routes: the shift applied by hand to the input or by
a hook on the module that sees it, the time embedding assembled from its submodules, a
single-stage run for the two-stage split, numbers summed or written out by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from family_cases import CASES, FAMILIES, dead_ends, model_inputs
from megatron_apex.families import build_model, count_parameters, get_family, get_model_config, model_names


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def tiny(family, **overrides):
    return get_model_config(CASES[family].tiny_test, **overrides)


def randomize(model, seed=0, skip=()):
    """Every parameter random (adaLN-Zero and zero heads would otherwise make blocks the
    identity and the output 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            scale, centre = (0.3 if p.dim() > 1 else 0.1), (1.0 if "norm" in name else 0.0)
            p.copy_(torch.randn(p.shape, generator=gen) * scale + centre)
    return model


def inputs(family, config, **kwargs):
    return model_inputs(config, getattr(config, CASES[family].context_field), **kwargs)


def model_for(family, seed=0, **overrides):
    config = tiny(family, **overrides)
    return config, randomize(build_model(config, backend="local").eval(), seed)


# ------------------------------------------------------------------------------ condition shift
@pytest.mark.parametrize("a,b", [(-1.0, 0.0), (-0.5, 1.0)])
@pytest.mark.parametrize("family", FAMILIES)
def test_fake_condition_at_input_site_shifts_the_raw_context(family, a, b):
    config, model = model_for(family, shift_site="input", shift_a=a, shift_b=b)
    x, t, ctx, mask = inputs(family, config)
    with torch.no_grad():
        fake = model(x, t, ctx, mask, fake_condition=True)
        by_hand = model(x, t, a * ctx + b, mask)
        real = model(x, t, ctx, mask)
    torch.testing.assert_close(fake, by_hand, rtol=0, atol=1e-6)
    assert (fake - real).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen-image"])
def test_fake_condition_at_projected_site_shifts_txt_in_output(family):
    a, b = -0.5, 1.0
    config, model = model_for(family, shift_site="projected", shift_a=a, shift_b=b)
    x, t, ctx, mask = inputs(family, config)
    with torch.no_grad():
        fake = model(x, t, ctx, mask, fake_condition=True)
        real = model(x, t, ctx, mask)
        handle = model.txt_in.register_forward_hook(lambda m, i, out: a * out + b)
        by_hand = model(x, t, ctx, mask)
        handle.remove()
    torch.testing.assert_close(fake, by_hand, rtol=0, atol=1e-6)
    assert (fake - real).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sana"])
def test_projected_shift_acts_on_what_the_cross_attention_sees(family):
    config, model = model_for(family, seed=2, shift_site="projected", shift_a=-1.0, shift_b=0.0)
    x, t, ctx, mask = inputs(family, config)
    seen = {}
    hook = model.layers[0].cross_attention.linear_k.register_forward_hook(
        lambda module, args, out: seen.setdefault("k_input", []).append(args[0]))
    with torch.no_grad():
        model(x, t, ctx, mask)
        model(x, t, ctx, mask, fake_condition=True)
    hook.remove()
    real, fake = seen["k_input"]
    assert torch.equal(fake, -real)


@pytest.mark.parametrize("family", ["qwen-image"])
def test_projected_scalar_shift_offset_b_is_invisible_to_the_model(family):
    """At the projected site c_fake = a*h + b adds b to every hidden unit of every text token. Each
    block reads the text stream through a LayerNorm (mean over the hidden units removed) and the
    text stream's own output is discarded, so b never reaches the image tokens: Table 7's columns
    are one column there. At the input site the text RMSNorm keeps b, so b matters."""
    def fake(site, a, b):
        config, model = model_for(family, shift_site=site, shift_a=a, shift_b=b)
        x, t, ctx, mask = inputs(family, config)
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
@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_fake_condition_changes_only_selected_rows(family, site):
    config, model = model_for(family, shift_site=site, shift_a=-0.5, shift_b=1.0)
    x, t, ctx, mask = inputs(family, config, B=4)
    rows = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = model(x, t, ctx, mask, fake_condition=rows)
        real = model(x, t, ctx, mask)
        fake = model(x, t, ctx, mask, fake_condition=True)
    torch.testing.assert_close(mixed[~rows], real[~rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[rows], fake[rows], rtol=0, atol=1e-6)
    assert (mixed[rows] - real[rows]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_fake_condition_with_wrong_batch_is_rejected(family):
    config, model = model_for(family)
    x, t, ctx, mask = inputs(family, config, B=3)
    with pytest.raises(ValueError, match="fake_condition"):
        model(x, t, ctx, mask, fake_condition=torch.tensor([True, False]))


# ------------------------------------------------------------------------------ target time
@pytest.mark.parametrize("family", FAMILIES)
def test_t_target_none_equals_t_target_t_exactly(family):
    config, model = model_for(family, target_time_init="copy")
    x, t, ctx, mask = inputs(family, config)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, mask), model(x, t, ctx, mask, t_target=t.clone()))
        # a python number is the same time for every sample
        assert torch.equal(model(x, 0.7, ctx, mask), model(x, torch.full((3,), 0.7), ctx, mask))


@pytest.mark.parametrize("family", ["qwen-image"])
def test_time_embedding_is_emb1_t_plus_emb2_tt_times_t_minus_tt(family):
    config, model = model_for(family, target_time_init="copy")
    x, t, ctx, mask = inputs(family, config)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_t_target_changes_the_output_when_the_embedder_exists(family):
    config, model = model_for(family, target_time_init="copy")
    x, t, ctx, mask = inputs(family, config)
    with torch.no_grad():
        assert (model(x, t, ctx, mask, t_target=torch.zeros_like(t)) - model(x, t, ctx, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_t_target_without_the_embedder_raises_unless_equal_to_t(family):
    config, model = model_for(family, target_time_embedder=False)
    x, t, ctx, mask = inputs(family, config)
    assert not hasattr(model, "target_time_embedder")
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, mask, t_target=t.clone()), model(x, t, ctx, mask))
        with pytest.raises(ValueError, match="target-time embedder") as err:
            model(x, t, ctx, mask, t_target=torch.zeros_like(t))
    assert "--target-time-embedder" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_initialised_target_embedder_ignores_t_target(family):
    config = tiny(family, target_time_init="zero")
    model = build_model(config, backend="local").eval()
    assert torch.count_nonzero(model.target_time_embedder.linear_2.weight) == 0
    randomize(model, skip=("target_time_embedder.linear_2",))
    x, t, ctx, mask = inputs(family, config)
    with torch.no_grad():
        a = model(x, t, ctx, mask, t_target=torch.zeros_like(t))
        b = model(x, t, ctx, mask, t_target=t * 0.5)
        c = model(x, t, ctx, mask)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_initialised_target_embedder_starts_as_the_first(family):
    model = build_model(tiny(family, target_time_init="copy"), backend="local")
    first, second = model.time_embedder.state_dict(), model.target_time_embedder.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.count_nonzero(first["linear_2.weight"]) > 0


# A weight each family starts at zero besides the output head (DiT adaLN-Zero modulation;
# PixArt / Sana cross-attention output).
ZERO_AT_INIT = {"qwen-image": "layers.0.img_modulation.linear.weight",
                "sana": "layers.0.cross_attention.linear_proj.weight"}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_init_starts_at_zero_output(family):
    """The output head starts at 0, so the velocity starts at exactly 0; the zero-initialised
    target-time embedder is the first one's linear_1 and a zero linear_2; the fused QKV is
    xavier-uniform."""
    from megatron_apex.parallel import set_seed

    config = tiny(family)
    set_seed(7)
    model = build_model(config, backend="local")
    x, t, ctx, mask = inputs(family, config)
    with torch.no_grad():
        out = model(x, t, ctx, mask)
    assert torch.equal(out, torch.zeros_like(out))
    assert not model.target_time_embedder.linear_2.weight.any()
    assert torch.equal(model.target_time_embedder.linear_1.weight, model.time_embedder.linear_1.weight)
    assert torch.count_nonzero(model.get_parameter(ZERO_AT_INIT[family])) == 0
    w = model.layers[0].attention.linear_qkv.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


# ------------------------------------------------------------------------------ training signal
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_parameter(family):
    """With fake rows (learnable full shift) and t_target != t every parameter gets a gradient,
    except the documented dead ends (family_cases.dead_ends)."""
    config, model = model_for(family, shift_kind="full", target_time_init="copy")
    model.train()
    x, t, ctx, mask = inputs(family, config, B=4)
    out = model(x, t, ctx, mask, fake_condition=torch.tensor([True, False, True, False]), t_target=t * 0.5)
    out.square().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert "condition_shift.A" in names and "target_time_embedder.linear_1.weight" in names
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0}
    assert no_grad == dead_ends(family, config.num_layers)


def _assert_same_grads(grads, reference, atol):
    for name, grad in grads.items():
        assert (grad is None) == (reference[name] is None), name  # the dead ends stay dead
        assert grad is None or torch.allclose(grad, reference[name], atol=atol), name


@pytest.mark.parametrize("family", ["sana"])
def test_selective_recompute_gives_the_same_numbers(family):
    from megatron_apex.parallel.recompute import enable_activation_recompute

    config = tiny(family)
    x, t, ctx, mask = inputs(family, config)
    results = []
    for granularity in (None, "selective", "full"):
        model = randomize(build_model(config, backend="local"), seed=9).train()
        if granularity:
            enable_activation_recompute(model, granularity)
        out = model(x, t, ctx, mask)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for out, grads in results[1:]:
        assert torch.allclose(out, results[0][0], atol=1e-6)
        _assert_same_grads(grads, results[0][1], atol=1e-5)


# ------------------------------------------------------------------------------ pipeline boundary
@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_chained_equal_the_whole_model_forward_and_backward(family):
    config, whole = model_for(family, seed=4, num_layers=3, target_time_init="copy")
    registered = get_family(family)
    first = registered.build(config, post_process=False, backend="local", layer_range=(0, 2)).eval()
    last = registered.build(config, pre_process=False, backend="local", layer_range=(2, 3)).eval()
    state = whole.state_dict()

    def stage_state(model):
        out = {}
        for key in model.state_dict():
            src = key
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                src = f"layers.{int(i) + model.layer_offset}.{rest}"
            out[key] = state[src]
        return out

    first.load_state_dict(stage_state(first))
    last.load_state_dict(stage_state(last))
    x, t, ctx, mask = inputs(family, config)
    tt = torch.rand(3, generator=torch.Generator().manual_seed(2))
    fake = torch.tensor([True, False, False])
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    ref = whole(x, t, ctx, mask, fake_condition=fake, t_target=tt)
    (ref * weights).sum().backward()
    stage = first(x, t, ctx, mask, fake_condition=fake, t_target=tt)
    B, L, (h, w) = 3, ctx.shape[1], x.shape[2:]
    assert stage.shape == first.stage_tensor_shape(B, L, h, w) == last.stage_tensor_shape(B, L, h, w)
    received = stage.detach().requires_grad_()
    last.set_input_tensor([received])  # megatron hands over a list
    out = last(x, t, ctx, mask)
    (out * weights).sum().backward()
    stage.backward(received.grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in whole.named_parameters()}
    _assert_same_grads({n: p.grad for n, p in first.named_parameters()}, grads, atol=1e-5)
    _assert_same_grads({n.replace("layers.0.", "layers.2."): p.grad for n, p in last.named_parameters()}, grads,
                       atol=1e-5)
    assert set(last.sharded_state_dict().keys()) >= {"layers.2.attention.linear_qkv.weight", "proj_out.weight"}
    with torch.no_grad():  # the whole batch fake, one target time
        last.set_input_tensor([first(x, t, ctx, mask, fake_condition=True, t_target=t * 0.5)])
        split = last(x, t, ctx, mask)
        torch.testing.assert_close(split, whole(x, t, ctx, mask, fake_condition=True, t_target=t * 0.5),
                                   rtol=0, atol=1e-6)

    last.set_input_tensor(stage.detach()[:-1])
    with pytest.raises(ValueError, match="pipeline input tensor has shape"):
        last(x, t, ctx, mask)
    fresh = registered.build(config, pre_process=False, backend="local", layer_range=(2, 3))
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        fresh(x, t, ctx, mask)
    with pytest.raises(ValueError, match="one input tensor"):
        fresh.set_input_tensor([stage, stage])


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_state_dict_covers_the_state_dict(family):
    config, model = model_for(family)
    keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    sharded = {k for k in model.sharded_state_dict() if not k.endswith("_extra_state")}
    assert sharded == keys


# ------------------------------------------------------------------------------ errors
# (what is wrong with (x, t, context, mask) of batch 3, 6x8 latents, 5 tokens; the message, with
# the family's flags)
BAD_INPUTS = [
    (lambda x, t, c, m: (x[0], t, c, m), "x_t must be a"),
    (lambda x, t, c, m: (x.repeat(1, 2, 1, 1), t, c, m), "{case.channels_flag}"),
    (lambda x, t, c, m: (x[..., :5], t, c, m), "multiples of --patch-size"),
    (lambda x, t, c, m: (x, t[:2], c, m), r"t must have shape \(3,\)"),
    (lambda x, t, c, m: (x, t, c[..., :5], m), "{case.context_flag}"),
    (lambda x, t, c, m: (x, t, c[:2], m), "context must be"),
    (lambda x, t, c, m: (x, t, c, m[:, :2]), "context_mask"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=["rank", "channels", "grid", "t", "context-width",
                                                            "context-batch", "mask"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_name_the_item(family, change, message):
    config, model = model_for(family)
    args = change(*inputs(family, config))
    with pytest.raises(ValueError, match=message.format(case=CASES[family])):
        model(*args)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_t_target_shape_is_named(family):
    config, model = model_for(family)
    x, t, ctx, mask = inputs(family, config)
    with pytest.raises(ValueError, match="t_target"):
        model(x, t, ctx, mask, t_target=torch.zeros(7))


# (family, overrides of its unit-test preset, --tensor-model-parallel-size, the error)
BAD_CONFIGS = [
    ("qwen-image", dict(axes_dims_rope=(4, 6, 8)), 1, "--axes-dims-rope"),
    ("qwen-image", dict(axes_dims_rope=(3, 7, 6)), 1, "--axes-dims-rope"),
    ("qwen-image", dict(in_channels=5), 1, "--in-channels"),
    ("sana", dict(num_cross_attention_heads=3), 2, r"--num-cross-attention-heads \(3\)"),
    ("sana", dict(mlp_ratio=2.4375), 2, "GLUMBConv width.*--tensor-model-parallel-size"),  # int(2.4375 * 16) = 39
    ("sana", dict(cross_attention_dim=24), 1, "--cross-attention-dim"),
    ("sana", dict(num_attention_heads=3, cross_attention_dim=16), 1, "--cross-attention-dim"),
    ("sana", dict(out_channels=2), 1, "--out-channels"),
    ("sana", dict(patch_size=0), 1, "--patch-size"),
    ("sana", dict(shift_site="output"), 1, "--shift-site"),
] + [(family, overrides, 1, flag) for family in FAMILIES for overrides, flag in (
    (dict(shift_site="middle"), "--shift-site"),
    (dict(shift_kind="affine"), "--shift-kind"),
    (dict(target_time_init="random"), "--target-time-init"),
    (dict(num_layers=0), "--num-layers"),
    (dict(params_dtype="fp8"), "--params-dtype"),
)]


@pytest.mark.parametrize("family,overrides,tp,flag", [
    pytest.param(*row, id=f"{row[0]}-{'-'.join(row[1])}-tp{row[2]}") for row in BAD_CONFIGS])
def test_bad_configs_name_the_flag(family, overrides, tp, flag):
    with pytest.raises(ValueError, match=flag):
        tiny(family).replace(**overrides).validate(tp)


@pytest.mark.parametrize("family,overrides,tp", [
    ("qwen-image", dict(num_attention_heads=3, axes_dims_rope=(4, 6, 6)), 2), ("sana", {}, 4)])
def test_heads_not_divisible_by_tp_is_reported(family, overrides, tp):
    config = tiny(family, **overrides)
    with pytest.raises(ValueError) as err:
        config.validate(tensor_model_parallel_size=tp)
    assert str(err.value) == (f"--num-attention-heads ({config.num_attention_heads}) must be divisible by "
                              f"--tensor-model-parallel-size ({tp})")


@pytest.mark.parametrize("family", ["sana"])
def test_sana_cross_attention_width_follows_the_heads(family):
    """The width the caption is projected to follows the trainer's --num-attention-heads / --kv-channels."""
    wider = tiny(family, num_attention_heads=3, attention_head_dim=6)
    assert wider.cross_attention_dim == wider.hidden_size == 18


@pytest.mark.parametrize("family,name,field", [("qwen-image", "qwen-image-7b", "num_heads"),
                                               ("sana", "sana-9b", "joint_attention_dim")])
def test_registry_errors_list_known_names(family, name, field):
    with pytest.raises(ValueError, match="unknown --model") as err:
        get_model_config(name)
    assert name in str(err.value) and CASES[family].tiny in str(err.value)
    config_class = type(tiny(family)).__name__
    with pytest.raises(ValueError, match=f"unknown {config_class} field '{field}'"):
        get_model_config(CASES[family].tiny, **{field: 4})


# ------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("family", FAMILIES)
def test_registry_configs_build_and_count(family):
    """Every preset but the released sizes (counted against diffusers on meta: test_diffusers_parity)."""
    case = CASES[family]
    names = sorted(set(get_family(family).presets) - set(case.released))
    assert case.tiny in names and case.tiny_test in names
    for name in names:
        config = get_model_config(name)
        model = build_model(config, backend="local")
        assert isinstance(model, case.our_model_class()), name
        assert count_parameters(config) == count_parameters(name) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_dispatches_on_the_config_type(family):
    case = CASES[family]
    assert set(model_names()) >= {*case.released, case.tiny, case.tiny_test}
    for name in get_family(family).presets:
        assert type(get_model_config(name)) is case.our_config_class(), name
    assert isinstance(build_model(case.tiny_test, backend="local"), case.our_model_class())
    with pytest.raises(ValueError, match="no model family"):
        build_model(object())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_takes_the_builtin_data(family):
    """28x28 grey images and 384-d MiniLM token states, as the built-in dataset provides."""
    from megatron_apex.data.builtin import IMAGE_SIZE

    config = get_model_config(CASES[family].tiny)
    assert config.out_channels == 1 and getattr(config, CASES[family].context_field) == 384
    model = build_model(config, backend="local")
    x = torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = model(x, torch.rand(2), torch.randn(2, 16, 384), torch.ones(2, 16))
    assert out.shape == x.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_non_square_and_text_lengths(family):
    config, model = model_for(family)
    for H, W, L in ((2, 10, 1), (12, 4, 9)):
        x, t, ctx, mask = inputs(family, config, B=2, H=H, W=W, L=L)
        with torch.no_grad():
            assert model(x, t, ctx, mask).shape == x.shape


# ------------------------------------------------------------------------------ megatron and specs
@pytest.mark.parametrize("family,widths", [("qwen-image", (32, 128, 16)), ("sana", (16, 40, 8))])
def test_transformer_config_carries_the_pipeline_dtype(family, widths):
    """widths: (hidden, ffn, kv channels) of the unit-test preset: Qwen-Image 2 x 16 with an MLP
    4x as wide, Sana 2 x 8 with a GLUMBConv of int(2.5 * 16)."""
    config = tiny(family, params_dtype="bfloat16")
    assert config.to_transformer_config(1, 2).pipeline_dtype == torch.bfloat16
    assert config.to_transformer_config(1, 1).pipeline_dtype is None
    tc = config.to_transformer_config(2, 1)
    assert (tc.hidden_size, tc.ffn_hidden_size, tc.kv_channels) == widths
    assert dataclasses.asdict(config) == dataclasses.asdict(type(config)(**dataclasses.asdict(config)))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_declares_what_megatron_reads(family):
    from megatron.core.enums import ModelType

    model = build_model(tiny(family), backend="local")
    assert model.model_type == ModelType.encoder_or_decoder
    assert model.share_embeddings_and_output_weights is False


@pytest.mark.parametrize("family", ["sana"])
def test_sana_depthwise_conv_is_split_over_tensor_parallel_ranks(family):
    depthwise = build_model(tiny(family), backend="local").layers[0].mlp.depthwise
    assert depthwise.weight.tensor_model_parallel and depthwise.weight.partition_dim == 0


def _qwen_image_local_spec(spec):
    from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear
    from megatron_apex.models.common.mlp import DenseMLP
    from megatron_apex.models.qwen_image.layers import SDPAttention

    assert spec.submodules.attention.submodules.core_attention is SDPAttention
    assert spec.submodules.attention.submodules.linear_qkv is FusedBiasColumnParallelLinear
    assert spec.submodules.mlp.module is DenseMLP


def _sana_local_spec(spec):
    from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
    from megatron_apex.models.sana.layers import ReLULinearAttention, SanaLayer

    assert spec.module is SanaLayer
    attention = spec.submodules.attention.submodules
    assert attention.linear_qkv is FusedBiasColumnParallelLinear and attention.linear_proj is FusedBiasRowParallelLinear
    assert attention.core_attention is ReLULinearAttention
    assert spec.submodules.mlp.submodules.linear_fc2 is FusedBiasRowParallelLinear


LOCAL_SPECS = {"qwen-image": _qwen_image_local_spec, "sana": _sana_local_spec}


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_spec_backends(family):
    from megatron_apex.models.specs import transformer_engine_available

    registered = get_family(family)
    local = registered.layer_spec("local")
    assert local.metainfo["backend"] == "local"
    LOCAL_SPECS[family](local)
    auto = registered.layer_spec("auto")
    assert auto.metainfo["backend"] == ("te" if transformer_engine_available() else "local")
    with pytest.raises(ValueError, match="backend"):
        registered.layer_spec("cuda")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="transformer_engine"):
            registered.layer_spec("te")
    else:
        te = registered.layer_spec("te")
        assert te.submodules.attention.submodules.core_attention.__name__ == "TEDotProductAttention"
