"""SanaModel behaviour beyond diffusers parity: the APEX inputs (condition shift, target
time), pipeline-stage chaining, config validation, input errors, registry and spec."""

from __future__ import annotations

import pytest
import torch

from megatron_apex.families import build_model, count_parameters, get_model_config, model_names
from megatron_apex.models.sana import SanaConfig


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def randomized(config, seed=0):
    """A model with every weight random (the default init zeroes the output projection)."""
    model = build_model(config, backend="local").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def batch(config, B=3, H=6, W=8, L=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, config.caption_channels, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    return x, t, ctx, mask


# ----------------------------------------------------------------------------- APEX inputs
@pytest.mark.parametrize("site", ["input", "projected"])
def test_fake_condition_shifts_exactly_the_selected_rows(site):
    config = get_model_config("sana-tiny-test", shift_site=site, shift_a=-0.5, shift_b=1.0)
    model = randomized(config)
    x, t, ctx, mask = batch(config)
    with torch.no_grad():
        real = model(x, t, ctx, mask)
        fake = model(x, t, ctx, mask, fake_condition=True)
        rows = torch.tensor([True, False, True])
        mixed = model(x, t, ctx, mask, fake_condition=rows)
    assert (fake - real).abs().max() > 1e-3  # the shift reaches the output
    # an independent recomputation of the shift: -0.5 c + 1 where it applies
    if site == "input":
        with torch.no_grad():
            by_hand = model(x, t, -0.5 * ctx + 1.0, mask)
        assert torch.allclose(fake, by_hand, atol=1e-6)
    assert torch.allclose(mixed[rows], fake[rows], atol=1e-6)
    assert torch.allclose(mixed[~rows], real[~rows], atol=1e-6)


def test_projected_shift_acts_on_what_the_cross_attention_sees():
    config = get_model_config("sana-tiny-test", shift_site="projected", shift_a=-1.0, shift_b=0.0)
    model = randomized(config, seed=2)
    x, t, ctx, mask = batch(config)
    seen = {}
    hook = model.layers[0].cross_attention.linear_k.register_forward_hook(
        lambda module, args, out: seen.setdefault("k_input", []).append(args[0]))
    with torch.no_grad():
        model(x, t, ctx, mask)
        model(x, t, ctx, mask, fake_condition=True)
    hook.remove()
    real, fake = seen["k_input"]
    assert torch.equal(fake, -real)


def test_t_target_none_equals_t_target_t_and_other_targets_differ():
    config = get_model_config("sana-tiny-test", target_time_init="copy")
    model = randomized(config, seed=3)
    x, t, ctx, mask = batch(config)
    with torch.no_grad():
        plain = model(x, t, ctx, mask)
        same = model(x, t, ctx, mask, t_target=t.clone())
        jump = model(x, t, ctx, mask, t_target=torch.zeros_like(t))
        scalar = model(x, 0.7, ctx, mask)
        vector = model(x, torch.full((3,), 0.7), ctx, mask)
    assert torch.equal(plain, same)
    assert (jump - plain).abs().max() > 1e-3
    assert torch.equal(scalar, vector)


def test_without_target_embedder_a_different_target_time_is_refused():
    config = get_model_config("sana-tiny-test", target_time_embedder=False)
    model = randomized(config)
    x, t, ctx, mask = batch(config)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, mask), model(x, t, ctx, mask, t_target=t))
    with pytest.raises(ValueError, match="target-time embedder"):
        model(x, t, ctx, mask, t_target=torch.zeros_like(t))


def test_zero_init_target_embedder_and_output_start_at_zero():
    config = get_model_config("sana-tiny-test")
    from megatron_apex.parallel import set_seed

    set_seed(7)
    model = build_model(config, backend="local")
    x, t, ctx, mask = batch(config)
    with torch.no_grad():
        out = model(x, t, ctx, mask)
    assert torch.equal(out, torch.zeros_like(out))  # proj_out starts at zero (PixArt / Sana)
    assert not model.target_time_embedder.linear_2.weight.any()
    assert torch.equal(model.target_time_embedder.linear_1.weight, model.time_embedder.linear_1.weight)
    assert not model.layers[0].cross_attention.linear_proj.weight.any()


# ----------------------------------------------------------------------------- pipeline stages
def test_two_stages_chained_equal_the_whole_model_forward_and_backward():
    config = get_model_config("sana-tiny-test", num_layers=3, target_time_init="copy")
    whole = randomized(config, seed=4)
    from megatron_apex.models.sana.model import SanaModel as cls
    first = cls(config, pre_process=True, post_process=False, layer_range=(0, 2))
    last = cls(config, pre_process=False, post_process=True, layer_range=(2, 3))
    state = whole.state_dict()
    first.load_state_dict({k: v for k, v in state.items() if not k.startswith(("layers.2.", "final_", "proj_out"))})
    last.load_state_dict({k.replace("layers.2.", "layers.0."): v for k, v in state.items()
                          if k.startswith(("layers.2.", "final_", "proj_out"))})
    x, t, ctx, mask = batch(config)
    tt = torch.rand(3, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    ref = whole(x, t, ctx, mask, fake_condition=torch.tensor([True, False, False]), t_target=tt)
    (ref * weights).sum().backward()
    stage = first(x, t, ctx, mask, fake_condition=torch.tensor([True, False, False]), t_target=tt)
    B, L, (h, w) = 3, 5, x.shape[2:]
    assert stage.shape == first.stage_tensor_shape(B, L, h, w) == last.stage_tensor_shape(B, L, h, w)
    received = stage.detach().requires_grad_()
    last.set_input_tensor([received])  # megatron hands over a list
    out = last(x, t, ctx, mask)
    (out * weights).sum().backward()
    stage.backward(received.grad)
    assert torch.allclose(out, ref, atol=1e-6)
    grads = {n: p.grad for n, p in whole.named_parameters()}
    for name, p in first.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5), name
    for name, p in last.named_parameters():
        assert torch.allclose(p.grad, grads[name.replace("layers.0.", "layers.2.")], atol=1e-5), name

    last.set_input_tensor(stage.detach()[:-1])
    with pytest.raises(ValueError, match="pipeline input tensor has shape"):
        last(x, t, ctx, mask)
    fresh = cls(config, pre_process=False, post_process=True, layer_range=(2, 3))
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        fresh(x, t, ctx, mask)
    with pytest.raises(ValueError, match="one input tensor"):
        fresh.set_input_tensor([stage, stage])


def test_selective_recompute_gives_the_same_numbers():
    from megatron_apex.parallel.recompute import enable_activation_recompute

    config = get_model_config("sana-tiny-test")
    x, t, ctx, mask = batch(config)
    results = []
    for granularity in (None, "selective", "full"):
        model = randomized(config, seed=9).train()
        if granularity:
            enable_activation_recompute(model, granularity)
        out = model(x, t, ctx, mask)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for out, grads in results[1:]:
        assert torch.allclose(out, results[0][0], atol=1e-6)
        assert all(torch.allclose(grads[n], results[0][1][n], atol=1e-5) for n in grads)


# ----------------------------------------------------------------------------- validation
def test_config_validation_names_the_flag():
    base = get_model_config("sana-tiny-test")  # 2 heads, 2 cross heads, GLUMBConv width 40
    with pytest.raises(ValueError, match=r"--num-attention-heads \(2\).*--tensor-model-parallel-size \(4\)"):
        base.validate(4)
    with pytest.raises(ValueError, match=r"--num-cross-attention-heads \(3\)"):
        base.replace(num_cross_attention_heads=3).validate(2)
    with pytest.raises(ValueError, match="GLUMBConv width.*--tensor-model-parallel-size"):
        base.replace(mlp_ratio=2.4375).validate(2)  # int(2.4375 * 16) = 39
    with pytest.raises(ValueError, match="--cross-attention-dim"):
        base.replace(cross_attention_dim=24).validate()
    # the width the caption is projected to follows the trainer's --num-attention-heads / --kv-channels
    wider = get_model_config("sana-tiny-test", num_attention_heads=3, attention_head_dim=6)
    assert wider.cross_attention_dim == wider.hidden_size == 18
    with pytest.raises(ValueError, match="--cross-attention-dim"):
        get_model_config("sana-tiny-test", num_attention_heads=3, cross_attention_dim=16)
    with pytest.raises(ValueError, match="--out-channels"):
        base.replace(out_channels=2).validate()
    with pytest.raises(ValueError, match="--patch-size"):
        base.replace(patch_size=0).validate()
    with pytest.raises(ValueError, match="--shift-site"):
        base.replace(shift_site="output").validate()
    with pytest.raises(ValueError, match="unknown SanaConfig field 'joint_attention_dim'"):
        base.replace(joint_attention_dim=3)
    with pytest.raises(ValueError, match="unknown --model"):
        get_model_config("sana-9b")


def test_transformer_config_carries_the_pipeline_dtype():
    import dataclasses

    config = get_model_config("sana-tiny-test", params_dtype="bfloat16")
    assert config.to_transformer_config(1, 2).pipeline_dtype == torch.bfloat16
    assert config.to_transformer_config(1, 1).pipeline_dtype is None
    tc = config.to_transformer_config(2, 1)
    assert (tc.hidden_size, tc.ffn_hidden_size, tc.kv_channels) == (16, 40, 8)
    assert dataclasses.asdict(config) == dataclasses.asdict(SanaConfig(**dataclasses.asdict(config)))


def test_bad_inputs_fail_with_one_clear_message():
    config = get_model_config("sana-tiny-test")
    model = randomized(config)
    x, t, ctx, mask = batch(config)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(3, 2, 6, 8), t, ctx, mask)
    with pytest.raises(ValueError, match="multiples of --patch-size"):
        model(torch.randn(3, 1, 5, 8), t, ctx, mask)
    with pytest.raises(ValueError, match="--caption-channels"):
        model(x, t, torch.randn(3, 5, 7), mask)
    with pytest.raises(ValueError, match="context_mask"):
        model(x, t, ctx, mask[:, :3])
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        model(x, torch.rand(2), ctx, mask)
    with pytest.raises(ValueError, match="fake_condition"):
        model(x, t, ctx, mask, fake_condition=torch.tensor([True, False]))


def test_model_declares_what_megatron_reads():
    from megatron.core.enums import ModelType

    model = build_model(get_model_config("sana-tiny-test"), backend="local")
    assert model.model_type == ModelType.encoder_or_decoder
    assert model.share_embeddings_and_output_weights is False
    depthwise = model.layers[0].mlp.depthwise
    assert depthwise.weight.tensor_model_parallel and depthwise.weight.partition_dim == 0


# ----------------------------------------------------------------------------- registry and spec
def test_registry_dispatches_on_the_config_type():
    from megatron_apex.models.qwen_image.config import QwenImageConfig
    from megatron_apex.models.qwen_image.model import QwenImageModel
    from megatron_apex.models.sana.model import SanaModel

    for name in ("sana-0.6b", "sana-1.6b", "sana-tiny", "sana-tiny-test"):
        assert isinstance(get_model_config(name), SanaConfig), name
    assert isinstance(get_model_config("qwen-image-tiny-test"), QwenImageConfig)
    assert isinstance(build_model("sana-tiny-test", backend="local"), SanaModel)
    assert isinstance(build_model("qwen-image-tiny-test", backend="local"), QwenImageModel)
    for name in ("sana-tiny", "sana-tiny-test"):  # the meta-device count against a real model's
        model = build_model(name, backend="local")
        assert count_parameters(name) == sum(p.numel() for p in model.parameters())
    assert set(model_names()) >= {"sana-0.6b", "sana-1.6b", "sana-tiny", "sana-tiny-test", "qwen-image-20b"}
    with pytest.raises(ValueError, match="no model family"):
        build_model(object())


def test_sana_tiny_takes_the_builtin_data():
    """28x28 grey images and 384-d MiniLM token states, as the built-in dataset provides."""
    from megatron_apex.data.builtin import IMAGE_SIZE

    config = get_model_config("sana-tiny")
    model = build_model(config, backend="local")
    x = torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = model(x, torch.rand(2), torch.randn(2, 16, 384), torch.ones(2, 16))
    assert out.shape == x.shape


def test_spec_pieces_and_te_backend():
    from megatron_apex.models.common.linear import FusedBiasColumnParallelLinear as ColumnParallelLinear
    from megatron_apex.models.common.linear import FusedBiasRowParallelLinear as RowParallelLinear
    from megatron_apex.models.sana.layer_spec import get_sana_layer_spec
    from megatron_apex.models.sana.layers import ReLULinearAttention, SanaLayer
    from megatron_apex.models.specs import transformer_engine_available

    spec = get_sana_layer_spec("local")
    assert spec.module is SanaLayer and spec.metainfo["backend"] == "local"
    attention = spec.submodules.attention.submodules
    assert attention.linear_qkv is ColumnParallelLinear and attention.linear_proj is RowParallelLinear
    assert attention.core_attention is ReLULinearAttention
    assert spec.submodules.mlp.submodules.linear_fc2 is RowParallelLinear
    with pytest.raises(ValueError, match="backend"):
        get_sana_layer_spec("cuda")
    if not transformer_engine_available():
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="transformer_engine"):
                get_sana_layer_spec("te")
