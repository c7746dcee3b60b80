"""SanaModel against diffusers' SanaTransformer2DModel (the independent reference): forward
and gradient parity on random tiny configs, state-dict conversion round trips, parameter
counts of the released sizes."""

from __future__ import annotations

import pytest
import torch

from megatron_apex.conversion import hf_to_megatron, load_diffusers_state_dict, megatron_to_hf
from megatron_apex.conversion.random_weights import randomize_weights_
from megatron_apex.families import build_model, count_parameters, get_model_config
from megatron_apex.families import sana as sm

diffusers = pytest.importorskip("diffusers")
from diffusers import SanaTransformer2DModel  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def random_diffusers(seed, **arch):
    torch.manual_seed(seed)
    hf = SanaTransformer2DModel(**arch).eval()
    randomize_weights_(hf, seed + 1)
    return hf


def diffusers_velocity(hf, x, t, ctx, mask):
    """The reference, called as Sana's flow pipelines call it: timestep = 1000 * sigma."""
    return hf(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t * 1000,
              return_dict=False)[0]


def arch(case, caption=20, layers=2):
    return dict(in_channels=case["C"], out_channels=case["C"], num_attention_heads=case["heads"],
                attention_head_dim=case["head_dim"], num_layers=layers, num_cross_attention_heads=case["xheads"],
                cross_attention_head_dim=case["xhead_dim"], cross_attention_dim=case["heads"] * case["head_dim"],
                caption_channels=caption, sample_size=8, patch_size=case["p"],
                attention_bias=case.get("bias", False))


CASES = [
    # self heads x dim, cross heads x dim, latent C, patch, B, H, W, L, mask pattern
    dict(heads=2, head_dim=8, xheads=2, xhead_dim=8, C=1, p=1, B=2, H=8, W=8, L=5, mask=None),
    dict(heads=3, head_dim=8, xheads=4, xhead_dim=6, C=2, p=2, B=3, H=6, W=10, L=7, mask="lengths", bias=True),
    dict(heads=4, head_dim=4, xheads=1, xhead_dim=16, C=4, p=1, B=4, H=5, W=3, L=6, mask="holes"),
    dict(heads=1, head_dim=16, xheads=2, xhead_dim=8, C=3, p=2, B=2, H=4, W=12, L=3, mask="lengths"),
]


def make_mask(kind, B, L, gen):
    if kind is None:
        return None
    mask = torch.zeros(B, L)
    if kind == "lengths":  # right padding, a different valid length per sample, one with all valid
        for i in range(B):
            mask[i, : L - i] = 1
    else:  # arbitrary holes, and a sample whose caption is entirely masked
        mask = (torch.rand(B, L, generator=gen) > 0.4).float()
        mask[0] = 0
        mask[1, 0] = 1
    return mask


def inputs(case, caption=20, seed=3):
    gen = torch.Generator().manual_seed(seed)
    B, H, W, L = case["B"], case["H"], case["W"], case["L"]
    x = torch.randn(B, case["C"], H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    t[0] = 1.0  # pure noise end
    ctx = torch.randn(B, L, caption, generator=gen)
    return x, t, ctx, make_mask(case["mask"], B, L, gen)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c['heads']}x{c['head_dim']}-x{c['xheads']}x{c['xhead_dim']}"
                                                     f"-p{c['p']}-{c['H']}x{c['W']}-{c['mask']}")
def test_forward_matches_diffusers(case):
    hf = random_diffusers(7, **arch(case))
    config = sm.config_from_diffusers(hf.config)
    model = build_model(config, backend="local").eval()
    load_diffusers_state_dict(model, hf.state_dict())
    x, t, ctx, mask = inputs(case)
    with torch.no_grad():
        ref = diffusers_velocity(hf, x, t, ctx, mask)
        ours = model(x, t, ctx, mask)
    assert ours.shape == x.shape
    assert ref.abs().max() > 0.1  # a non-degenerate reference
    assert (ours - ref).abs().max().item() <= TOL


def test_gradients_match_diffusers():
    """Backward through every piece (interleaved GLUMBConv halves included): our gradients,
    converted to diffusers' names, are diffusers' gradients."""
    case = CASES[1]
    hf = random_diffusers(5, **arch(case))
    config = sm.config_from_diffusers(hf.config, target_time_embedder=False)
    model = build_model(config, backend="local")
    load_diffusers_state_dict(model, hf.state_dict())
    x, t, ctx, mask = inputs(case, seed=8)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (model(x, t, ctx, mask) * weights).sum().backward()
    (diffusers_velocity(hf, x, t, ctx, mask) * weights).sum().backward()
    ours = megatron_to_hf({n: p.grad for n, p in model.named_parameters()}, config)
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    assert ours.keys() == theirs.keys()
    for key, ref in theirs.items():
        assert ref.abs().max() > 0, key  # every weight is exercised
        assert (ours[key] - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item()), key


def test_zero_initialised_target_embedder_keeps_a_flow_matching_checkpoint_exact():
    """A plain diffusers checkpoint gets time_embed_2 filled with a zero last linear: the output
    equals diffusers' for ANY t_target."""
    case = CASES[0]
    hf = random_diffusers(11, **arch(case, layers=1))
    config = sm.config_from_diffusers(hf.config, target_time_embedder=True, target_time_init="zero")
    model = build_model(config, backend="local").eval()
    load_diffusers_state_dict(model, hf.state_dict())
    x, t, ctx, _ = inputs(case)
    with torch.no_grad():
        ref = diffusers_velocity(hf, x, t, ctx, None)
        ours = model(x, t, ctx, t_target=torch.zeros(case["B"]))
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("shift_kind", ["scalar", "full"])
def test_state_dict_round_trips_bit_exactly(shift_kind):
    """ours -> HF -> ours and HF -> ours -> HF, APEX extras (target embedder, learnable shift)
    included; the fused QKV and the interleaved GLUMBConv halves split back exactly."""
    config = get_model_config("sana-tiny-test", num_attention_heads=3, attention_head_dim=4, cross_attention_dim=12,
                              attention_bias=True, shift_kind=shift_kind, target_time_init="copy")
    model = build_model(config, backend="local")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_sd = megatron_to_hf(ours, config)
    assert "time_embed_2.emb.timestep_embedder.linear_2.weight" in hf_sd
    assert ("condition_shift.A" in hf_sd) == (shift_kind == "full")
    back = hf_to_megatron(hf_sd, config)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    again = megatron_to_hf(back, config)
    assert again.keys() == hf_sd.keys() and all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)

    # diffusers' layouts: q of head 1 at rows [3*hd, 4*hd) of the fused weight; the GLUMBConv
    # x channel j at row 2j and gate channel j at row 2j+1 of ours, rows j and H + j of diffusers'.
    hd, ffn = config.attention_head_dim, config.ffn_hidden_size
    fused = ours["layers.0.attention.linear_qkv.weight"]
    assert torch.equal(hf_sd["transformer_blocks.0.attn1.to_q.weight"][hd:2 * hd], fused[3 * hd:4 * hd])
    fc1 = ours["layers.1.mlp.linear_fc1.weight"]
    inverted = hf_sd["transformer_blocks.1.ff.conv_inverted.weight"]
    assert inverted.shape == (2 * ffn, config.hidden_size, 1, 1)
    assert torch.equal(inverted[5, :, 0, 0], fc1[10]) and torch.equal(inverted[ffn + 5, :, 0, 0], fc1[11])
    depth = hf_sd["transformer_blocks.1.ff.conv_depth.weight"]
    assert torch.equal(depth[ffn + 2], ours["layers.1.mlp.depthwise.weight"][5])
    assert hf_sd["transformer_blocks.0.ff.conv_point.weight"].shape == (config.hidden_size, ffn, 1, 1)


def test_diffusers_state_dict_round_trips_bit_exactly():
    hf = random_diffusers(2, **arch(CASES[1]))
    config = sm.config_from_diffusers(hf.config, target_time_embedder=False)
    hf_sd = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(hf_sd, config), config)
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_conversion_errors_name_the_key():
    hf = random_diffusers(2, **arch(CASES[0], layers=1))
    config = sm.config_from_diffusers(hf.config, target_time_embedder=False)
    sd = dict(hf.state_dict())
    missing = dict(sd)
    del missing["transformer_blocks.0.ff.conv_depth.bias"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.ff\.conv_depth\.bias"):
        hf_to_megatron(missing, config)
    extra = dict(sd, **{"time_embed_2.emb.timestep_embedder.linear_1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"time_embed_2"):
        hf_to_megatron(extra, config)  # this model has no target embedder to put it in
    for key, value in (("guidance_embeds", True), ("qk_norm", "rms_norm_across_heads"),
                       ("interpolation_scale", 1.0), ("timestep_scale", 1000.0), ("norm_elementwise_affine", True)):
        with pytest.raises(ValueError, match=key):
            sm.config_from_diffusers(dict(hf.config, **{key: value}))
    with pytest.raises(ValueError, match="--cross-attention-dim"):
        sm.config_from_diffusers(dict(hf.config, cross_attention_dim=hf.config.cross_attention_dim + 1))


# Sana 0.6B as diffusers' scripts/convert_sana_to_diffusers.py builds it (1.6B: the class defaults).
SANA_600M = dict(num_attention_heads=36, attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                 cross_attention_head_dim=72, cross_attention_dim=1152)


@pytest.mark.parametrize("name,diffusers_args,low,high", [("sana-0.6b", SANA_600M, 0.58e9, 0.60e9),
                                                          ("sana-1.6b", {}, 1.59e9, 1.62e9)])
def test_parameter_count_equals_diffusers(name, diffusers_args, low, high):
    with torch.device("meta"):
        hf = SanaTransformer2DModel(**diffusers_args)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert low < hf_count < high  # the reference is the intended model
    plain = get_model_config(name, target_time_embedder=False)
    assert sm.config_from_diffusers(hf.config, target_time_embedder=False) == plain
    assert count_parameters(plain) == hf_count
    embedder = sum(p.numel() for p in hf.time_embed.emb.timestep_embedder.parameters())
    assert count_parameters(name) == hf_count + embedder  # + time_embed_2
