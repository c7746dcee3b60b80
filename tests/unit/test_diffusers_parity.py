"""Our model of every family against its diffusers transformer (the independent reference):
forward (and, for Sana, gradient) parity on random tiny configs, state-dict conversion round
trips, conversion errors and parameter counts of the released sizes."""

from __future__ import annotations

import pytest
import torch

from family_cases import CASES, FAMILIES, TOL
from megatron_apex.conversion import hf_to_megatron, load_diffusers_state_dict, megatron_to_hf
from megatron_apex.families import build_model, count_parameters, family_names, get_family, get_model_config

pytest.importorskip("diffusers")


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def test_every_registered_family_has_a_test_case():
    assert sorted(family_names()) == sorted(FAMILIES)


def qwen_image_arch(heads, head_dim, axes, C, layers=2):
    # QwenImagePipeline's 2x2 patches: C latent channels are 4 C packed ones
    return dict(patch_size=2, in_channels=C * 4, out_channels=C, num_layers=layers, attention_head_dim=head_dim,
                num_attention_heads=heads, joint_attention_dim=20, axes_dims_rope=axes)


def sana_arch(heads, head_dim, xheads, xhead_dim, C, p, bias=False, layers=2):
    return dict(in_channels=C, out_channels=C, num_attention_heads=heads, attention_head_dim=head_dim,
                num_layers=layers, num_cross_attention_heads=xheads, cross_attention_head_dim=xhead_dim,
                cross_attention_dim=heads * head_dim, caption_channels=20, sample_size=8, patch_size=p,
                attention_bias=bias)


# family -> [(diffusers architecture (text width 20), (B, H, W, L), mask pattern)]
FORWARD_CASES = {
    "qwen-image": [
        (qwen_image_arch(2, 16, (4, 6, 6), C=1), (2, 8, 8, 5), None),
        (qwen_image_arch(3, 24, (8, 8, 8), C=2), (3, 6, 10, 7), "lengths"),
        (qwen_image_arch(4, 8, (2, 2, 4), C=4), (4, 12, 4, 6), "holes"),
        (qwen_image_arch(1, 32, (0, 16, 16), C=1), (2, 14, 6, 3), "lengths"),
    ],
    "sana": [
        (sana_arch(2, 8, 2, 8, C=1, p=1), (2, 8, 8, 5), None),
        (sana_arch(3, 8, 4, 6, C=2, p=2, bias=True), (3, 6, 10, 7), "lengths"),
        (sana_arch(4, 4, 1, 16, C=4, p=1), (4, 5, 3, 6), "holes"),
        (sana_arch(1, 16, 2, 8, C=3, p=2), (2, 4, 12, 3), "lengths"),
    ],
}


def _case_id(family, arch, shape, mask):
    return f"{family}-h{arch['num_attention_heads']}x{arch['attention_head_dim']}-p{arch['patch_size']}-" \
           f"{shape[1]}x{shape[2]}-{mask}"


def random_diffusers(family, seed, arch):
    return CASES[family].random_diffusers(seed, **arch)


def make_mask(kind, B, L, gen):
    if kind is None:
        return None
    mask = torch.zeros(B, L)
    if kind == "lengths":  # right padding, a different valid length per sample, one with all valid
        for i in range(B):
            mask[i, : L - i] = 1
    else:  # arbitrary holes, and a sample whose text is entirely masked
        mask = (torch.rand(B, L, generator=gen) > 0.4).float()
        mask[0] = 0
        mask[1, 0] = 1
    return mask


def inputs(arch, shape, mask_kind, seed=3):
    gen = torch.Generator().manual_seed(seed)
    B, H, W, L = shape
    x = torch.randn(B, arch["out_channels"], H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    t[0] = 1.0  # pure noise end
    ctx = torch.randn(B, L, 20, generator=gen)
    return x, t, ctx, make_mask(mask_kind, B, L, gen)


def ours_from(family, hf, **overrides):
    config = get_family(family).config_from_diffusers(hf.config, **overrides)
    model = build_model(config, backend="local")
    load_diffusers_state_dict(model, hf.state_dict())
    return config, model


@pytest.mark.parametrize("family,arch,shape,mask_kind", [
    pytest.param(family, *case, id=_case_id(family, *case)) for family in FAMILIES for case in FORWARD_CASES[family]])
def test_forward_matches_diffusers(family, arch, shape, mask_kind):
    hf = random_diffusers(family, 7, arch)
    _, model = ours_from(family, hf)
    model.eval()
    x, t, ctx, mask = inputs(arch, shape, mask_kind)
    with torch.no_grad():
        ref = CASES[family].velocity(hf, x, t, ctx, mask)
        ours = model(x, t, ctx, mask)
    assert ours.shape == x.shape
    assert ref.abs().max() > 0.1  # a non-degenerate reference
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["sana"])
def test_gradients_match_diffusers(family):
    """Backward through every piece (interleaved GLUMBConv halves included): our gradients,
    converted to diffusers' names, are diffusers' gradients."""
    arch, shape, mask_kind = FORWARD_CASES[family][1]
    hf = random_diffusers(family, 5, arch)
    config, model = ours_from(family, hf, target_time_embedder=False)
    x, t, ctx, mask = inputs(arch, shape, mask_kind, seed=8)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (model(x, t, ctx, mask) * weights).sum().backward()
    (CASES[family].velocity(hf, x, t, ctx, mask) * weights).sum().backward()
    ours = megatron_to_hf({n: p.grad for n, p in model.named_parameters()}, config)
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    assert ours.keys() == theirs.keys()
    for key, ref in theirs.items():
        assert ref.abs().max() > 0, key  # every weight is exercised
        assert (ours[key] - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item()), key


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_initialised_target_embedder_keeps_a_flow_matching_checkpoint_exact(family):
    """A plain diffusers checkpoint gets the target-time embedder filled with a zero last linear:
    the output equals diffusers' for ANY t_target."""
    arch, shape, _ = FORWARD_CASES[family][0]
    arch = dict(arch, num_layers=1)
    hf = random_diffusers(family, 11, arch)
    _, model = ours_from(family, hf, target_time_embedder=True, target_time_init="zero")
    model.eval()
    x, t, ctx, _ = inputs(arch, shape, None)
    with torch.no_grad():
        ref = CASES[family].velocity(hf, x, t, ctx, None)
        ours = model(x, t, ctx, t_target=torch.zeros(shape[0]))
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["qwen-image"])
def test_pack_and_unpack_match_the_pipeline(family):
    from diffusers import QwenImagePipeline

    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    x = torch.randn(3, 5, 6, 10)
    packed = pack_latents(x, 2)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x, 3, 5, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10, 2), QwenImagePipeline._unpack_latents(packed, 48, 80, 8)[:, :, 0])


def _glumbconv_halves_interleave(ours, hf_sd, config):
    """The GLUMBConv x channel j at row 2j and gate channel j at row 2j+1 of ours, rows j and
    H + j of diffusers'."""
    ffn = config.ffn_hidden_size
    fc1 = ours["layers.1.mlp.linear_fc1.weight"]
    inverted = hf_sd["transformer_blocks.1.ff.conv_inverted.weight"]
    assert inverted.shape == (2 * ffn, config.hidden_size, 1, 1)
    assert torch.equal(inverted[5, :, 0, 0], fc1[10]) and torch.equal(inverted[ffn + 5, :, 0, 0], fc1[11])
    depth = hf_sd["transformer_blocks.1.ff.conv_depth.weight"]
    assert torch.equal(depth[ffn + 2], ours["layers.1.mlp.depthwise.weight"][5])
    assert hf_sd["transformer_blocks.0.ff.conv_point.weight"].shape == (config.hidden_size, ffn, 1, 1)


# (family, overrides of its unit-test preset, what else splits back in diffusers' layout)
ROUND_TRIP_MODELS = {
    "qwen-image": (dict(num_attention_heads=3, attention_head_dim=8, axes_dims_rope=(2, 2, 4)), ()),
    "sana": (dict(num_attention_heads=3, attention_head_dim=4, cross_attention_dim=12, attention_bias=True),
             (_glumbconv_halves_interleave,)),
}


@pytest.mark.parametrize("shift_kind", ["scalar", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trips_bit_exactly(family, shift_kind):
    """ours -> HF -> ours and HF -> ours -> HF, APEX extras (target embedder, learnable shift)
    included; megatron's fused per-head QKV splits back into diffusers' q/k/v exactly."""
    case, (overrides, layout_checks) = CASES[family], ROUND_TRIP_MODELS[family]
    config = get_model_config(case.tiny_test, **overrides, shift_kind=shift_kind, target_time_init="copy")
    model = build_model(config, backend="local")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_sd = megatron_to_hf(ours, config)
    assert f"{case.target_embedder}.linear_2.weight" in hf_sd
    assert ("condition_shift.A" in hf_sd) == (shift_kind == "full")
    back = hf_to_megatron(hf_sd, config)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    again = megatron_to_hf(back, config)
    assert again.keys() == hf_sd.keys() and all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)

    # The split is diffusers' layout: q of head 1 sits at rows [3*hd, 4*hd) of the fused weight.
    hd = config.attention_head_dim
    fused = ours["layers.0.attention.linear_qkv.weight"]
    attention = case.self_attention.format(i=0)
    assert torch.equal(hf_sd[attention + "to_q.weight"][hd:2 * hd], fused[3 * hd:4 * hd])
    assert torch.equal(hf_sd[attention + "to_v.weight"][:hd], fused[2 * hd:3 * hd])
    for check in layout_checks:
        check(ours, hf_sd, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_state_dict_round_trips_bit_exactly(family):
    hf = random_diffusers(family, 2, FORWARD_CASES[family][1][0])
    config = get_family(family).config_from_diffusers(hf.config, target_time_embedder=False)
    hf_sd = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(hf_sd, config), config)
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


# (family, a weight of the first block, the diffusers settings (key, value, error) it refuses)
CONVERSION_ERRORS = [
    pytest.param("qwen-image", "transformer_blocks.0.attn.add_k_proj.bias",
                 [("guidance_embeds", True, "guidance_embeds")], id="qwen-image"),
    pytest.param("sana", "transformer_blocks.0.ff.conv_depth.bias",
                 [("guidance_embeds", True, "guidance_embeds"), ("qk_norm", "rms_norm_across_heads", "qk_norm"),
                  ("interpolation_scale", 1.0, "interpolation_scale"), ("timestep_scale", 1000.0, "timestep_scale"),
                  ("norm_elementwise_affine", True, "norm_elementwise_affine"),
                  ("cross_attention_dim", 17, "--cross-attention-dim")],  # 2 heads x 8 = 16 wide
                 id="sana"),
]


@pytest.mark.parametrize("family,weight,refused", CONVERSION_ERRORS)
def test_conversion_errors_name_the_key(family, weight, refused):
    case, registered = CASES[family], get_family(family)
    hf = random_diffusers(family, 2, dict(FORWARD_CASES[family][0][0], num_layers=1))
    config = registered.config_from_diffusers(hf.config, target_time_embedder=False)
    sd = dict(hf.state_dict())
    missing = dict(sd)
    del missing[weight]
    with pytest.raises(ValueError, match=weight.replace(".", r"\.")):
        hf_to_megatron(missing, config)
    target = case.target_embedder.split(".")[0]
    extra = dict(sd, **{f"{case.target_embedder}.linear_1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=target):
        hf_to_megatron(extra, config)  # this model has no target embedder to put it in
    for key, value, error in refused:
        with pytest.raises(ValueError, match=error):
            registered.config_from_diffusers(dict(hf.config, **{key: value}))


# Sana 0.6B as diffusers' scripts/convert_sana_to_diffusers.py builds it (1.6B and Qwen-Image 20B:
# the class defaults).
SANA_600M = dict(num_attention_heads=36, attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                 cross_attention_head_dim=72, cross_attention_dim=1152)


@pytest.mark.parametrize("family,name,diffusers_args,low,high", [
    pytest.param("qwen-image", "qwen-image-20b", {}, 20.4e9, 20.5e9, id="qwen-image-20b"),
    pytest.param("sana", "sana-0.6b", SANA_600M, 0.58e9, 0.60e9, id="sana-0.6b"),
    pytest.param("sana", "sana-1.6b", {}, 1.59e9, 1.62e9, id="sana-1.6b")])
def test_parameter_count_equals_diffusers(family, name, diffusers_args, low, high):
    case = CASES[family]
    assert name in case.released
    with torch.device("meta"):
        hf = case.diffusers_model()(**diffusers_args)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert low < hf_count < high  # the reference is the intended model
    plain = get_model_config(name, target_time_embedder=False)
    assert get_family(family).config_from_diffusers(hf.config, target_time_embedder=False) == plain
    assert count_parameters(plain) == hf_count
    embedder = sum(p.numel() for p in hf.get_submodule(case.time_embedder).parameters())
    assert count_parameters(name) == hf_count + embedder  # + the target-time embedder
