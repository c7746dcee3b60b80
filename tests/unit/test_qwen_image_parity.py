"""QwenImageModel against diffusers' QwenImageTransformer2DModel (the independent reference):
forward parity on random tiny configs, state-dict conversion round trips, parameter counts."""

from __future__ import annotations

import pytest
import torch
from megatron_apex.conversion.random_weights import randomize_weights_

from megatron_apex.conversion import hf_to_megatron, load_diffusers_state_dict, megatron_to_hf
from megatron_apex.families import build_model, count_parameters, get_model_config
from megatron_apex.families.qwen_image import config_from_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def random_diffusers(seed, **arch):
    torch.manual_seed(seed)
    hf = QwenImageTransformer2DModel(**arch).eval()
    randomize_weights_(hf, seed + 1)
    return hf


def diffusers_velocity(hf, x, t, ctx, mask, patch):
    """The reference: pack exactly as QwenImagePipeline does, run diffusers, unpack."""
    b, c, h, w = x.shape
    assert patch == 2, "QwenImagePipeline packs 2x2 patches"
    tokens = QwenImagePipeline._pack_latents(x, b, c, h, w)
    out = hf(hidden_states=tokens, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t,
             img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
    # _unpack_latents takes pixel sizes (latent * vae_scale_factor) and returns (B, C, 1, H, W).
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


CASES = [
    # heads, head_dim, axes, latent C, B, H, W, L, mask pattern
    dict(heads=2, head_dim=16, axes=(4, 6, 6), C=1, B=2, H=8, W=8, L=5, mask=None),
    dict(heads=3, head_dim=24, axes=(8, 8, 8), C=2, B=3, H=6, W=10, L=7, mask="lengths"),
    dict(heads=4, head_dim=8, axes=(2, 2, 4), C=4, B=4, H=12, W=4, L=6, mask="holes"),
    dict(heads=1, head_dim=32, axes=(0, 16, 16), C=1, B=2, H=14, W=6, L=3, mask="lengths"),
]


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c['heads']}x{c['head_dim']}-{c['H']}x{c['W']}-{c['mask']}")
def test_forward_matches_diffusers(case):
    C, patch = case["C"], 2
    hf = random_diffusers(7, patch_size=patch, in_channels=C * patch * patch, out_channels=C, num_layers=2,
                          attention_head_dim=case["head_dim"], num_attention_heads=case["heads"],
                          joint_attention_dim=20, axes_dims_rope=case["axes"])
    config = config_from_diffusers(hf.config)
    model = build_model(config, backend="local").eval()
    load_diffusers_state_dict(model, hf.state_dict())

    gen = torch.Generator().manual_seed(3)
    B, H, W, L = case["B"], case["H"], case["W"], case["L"]
    x = torch.randn(B, C, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    t[0] = 1.0  # pure noise end
    ctx = torch.randn(B, L, 20, generator=gen)
    mask = make_mask(case["mask"], B, L, gen)
    with torch.no_grad():
        ref = diffusers_velocity(hf, x, t, ctx, mask, patch)
        ours = model(x, t, ctx, mask)
    assert ours.shape == x.shape
    assert ref.abs().max() > 0.1  # a non-degenerate reference
    assert (ours - ref).abs().max().item() <= TOL


def test_zero_initialised_target_embedder_keeps_a_flow_matching_checkpoint_exact():
    """A plain diffusers checkpoint gets time_text_embed_2 filled with a zero last linear: the
    output equals diffusers' for ANY t_target."""
    hf = random_diffusers(11, patch_size=2, in_channels=4, out_channels=1, num_layers=1, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6))
    config = config_from_diffusers(hf.config, target_time_embedder=True, target_time_init="zero")
    model = build_model(config, backend="local").eval()
    load_diffusers_state_dict(model, hf.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 1, 4, 6, generator=gen), torch.rand(2, generator=gen), torch.randn(2, 3, 12, generator=gen)
    with torch.no_grad():
        ref = diffusers_velocity(hf, x, t, ctx, None, 2)
        ours = model(x, t, ctx, t_target=torch.zeros(2))
    assert (ours - ref).abs().max().item() <= TOL


def test_pack_and_unpack_match_the_pipeline():
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    x = torch.randn(3, 5, 6, 10)
    packed = pack_latents(x, 2)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x, 3, 5, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10, 2), QwenImagePipeline._unpack_latents(packed, 48, 80, 8)[:, :, 0])


@pytest.mark.parametrize("shift_kind", ["scalar", "full"])
def test_state_dict_round_trips_bit_exactly(shift_kind):
    """ours -> HF -> ours and HF -> ours -> HF, APEX extras (target embedder, learnable shift)
    included; megatron's fused per-head QKV splits back into diffusers' q/k/v exactly."""
    config = get_model_config("qwen-image-tiny-test", num_attention_heads=3, attention_head_dim=8,
                              axes_dims_rope=(2, 2, 4), shift_kind=shift_kind, target_time_init="copy")
    model = build_model(config, backend="local")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_sd = megatron_to_hf(ours, config)
    assert "time_text_embed_2.timestep_embedder.linear_2.weight" in hf_sd
    assert ("condition_shift.A" in hf_sd) == (shift_kind == "full")
    back = hf_to_megatron(hf_sd, config)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    again = megatron_to_hf(back, config)
    assert again.keys() == hf_sd.keys() and all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)

    # The split is diffusers' layout: q of head 1 sits at rows [3*hd, 4*hd) of the fused weight.
    hd = config.attention_head_dim
    fused = ours["layers.0.attention.linear_qkv.weight"]
    assert torch.equal(hf_sd["transformer_blocks.0.attn.to_q.weight"][hd:2 * hd], fused[3 * hd:4 * hd])
    assert torch.equal(hf_sd["transformer_blocks.0.attn.to_v.weight"][:hd], fused[2 * hd:3 * hd])


def test_diffusers_state_dict_round_trips_bit_exactly():
    hf = random_diffusers(2, patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=10, axes_dims_rope=(2, 2, 4))
    config = config_from_diffusers(hf.config, target_time_embedder=False)
    hf_sd = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(hf_sd, config), config)
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_conversion_errors_name_the_key():
    hf = random_diffusers(2, patch_size=2, in_channels=4, out_channels=1, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=10, axes_dims_rope=(2, 2, 4))
    config = config_from_diffusers(hf.config, target_time_embedder=False)
    sd = dict(hf.state_dict())
    missing = dict(sd)
    del missing["transformer_blocks.0.attn.add_k_proj.bias"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.add_k_proj\.bias"):
        hf_to_megatron(missing, config)
    extra = dict(sd, **{"time_text_embed_2.timestep_embedder.linear_1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"time_text_embed_2"):
        hf_to_megatron(extra, config)  # this model has no target embedder to put it in
    with pytest.raises(ValueError, match="guidance_embeds"):
        config_from_diffusers(dict(hf.config, guidance_embeds=True))


def test_parameter_count_of_qwen_image_20b_equals_diffusers():
    with torch.device("meta"):
        hf = QwenImageTransformer2DModel()  # class defaults are the 20B model
    hf_count = sum(p.numel() for p in hf.parameters())
    assert 20.4e9 < hf_count < 20.5e9
    plain = get_model_config("qwen-image-20b", target_time_embedder=False)
    assert count_parameters(plain) == hf_count
    embedder = sum(p.numel() for p in hf.time_text_embed.timestep_embedder.parameters())
    assert count_parameters("qwen-image-20b") == hf_count + embedder  # + time_text_embed_2
