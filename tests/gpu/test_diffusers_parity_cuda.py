"""float32 on CUDA against diffusers' models (same weights, padded text, non-square grid):
outputs and gradients (what tools/gpu_check.py checked before tests/gpu existed)."""

from __future__ import annotations

import pytest
import torch
from _gpu_helpers import rel

from megatron_apex.conversion import load_diffusers_state_dict, megatron_to_hf
from megatron_apex.conversion.random_weights import randomize_weights_
from megatron_apex.families import build_model
from megatron_apex.families import sana as sm
from megatron_apex.families.qwen_image import config_from_diffusers
from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

diffusers = pytest.importorskip("diffusers")


def _mask(B, L):
    mask = torch.ones(B, L)
    for i in range(B):
        mask[i, L - 2 * i:] = 0
    return mask


def test_qwen_image_float32_matches_diffusers(device):
    arch = dict(patch_size=2, in_channels=8, out_channels=2, num_layers=3, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
    torch.manual_seed(0)
    hf = randomize_weights_(diffusers.QwenImageTransformer2DModel(**arch), 1)
    ours = build_model(config_from_diffusers(hf.config), backend="local")
    load_diffusers_state_dict(ours, hf.state_dict())
    hf, ours = hf.to(device), ours.to(device)
    gen = torch.Generator().manual_seed(1)
    B, C, H, W, L = 4, 2, 16, 24, 9
    x, t = torch.randn(B, C, H, W, generator=gen).to(device), torch.rand(B, generator=gen).to(device)
    ctx, mask = torch.randn(B, L, 48, generator=gen).to(device), _mask(B, L).to(device)
    weight = torch.randn(B, C, H, W, generator=gen).to(device)
    out = ours(x, t, ctx, mask)
    ref = hf(hidden_states=pack_latents(x, 2), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
             timestep=t, img_shapes=[(1, H // 2, W // 2)] * B, return_dict=False)[0]
    ref = unpack_latents(ref, H, W, 2)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    g_ours = ours.layers[1].attention.linear_proj.weight.grad
    g_ref = hf.transformer_blocks[1].attn.to_out[0].weight.grad
    assert rel(g_ours, g_ref) < 1e-4
    assert rel(ours.img_in.weight.grad, hf.img_in.weight.grad) < 1e-4


def test_sana_float32_matches_diffusers(device):
    arch = dict(in_channels=2, out_channels=2, num_attention_heads=3, attention_head_dim=8, num_layers=2,
                num_cross_attention_heads=4, cross_attention_head_dim=6, cross_attention_dim=24, caption_channels=20,
                sample_size=8, patch_size=2)
    torch.manual_seed(0)
    hf = randomize_weights_(diffusers.SanaTransformer2DModel(**arch), 1)
    config = sm.config_from_diffusers(hf.config)
    ours = build_model(config, backend="local")
    load_diffusers_state_dict(ours, hf.state_dict())
    hf, ours = hf.to(device), ours.to(device)
    gen = torch.Generator().manual_seed(2)
    B, H, W, L = 3, 6, 10, 7
    x, t = torch.randn(B, 2, H, W, generator=gen).to(device), torch.rand(B, generator=gen).to(device)
    ctx, mask = torch.randn(B, L, 20, generator=gen).to(device), _mask(B, L).to(device)
    weight = torch.randn(B, 2, H, W, generator=gen).to(device)
    out = ours(x, t, ctx, mask)
    ref = hf(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t * 1000,
             return_dict=False)[0]
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    ours_grads = megatron_to_hf({n: p.grad for n, p in ours.named_parameters()}, config)
    for key, param in hf.named_parameters():  # absolute: some gradients are zero up to rounding (key biases)
        ref_grad = param.grad
        assert (ours_grads[key] - ref_grad).abs().max().item() <= 1e-4 * max(1.0, ref_grad.abs().max().item()), key
