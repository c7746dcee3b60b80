"""LoRA <-> diffusers: stock ``QwenImageTransformer2DModel`` with our exported LoRA file
(loaded by ``QwenImagePipeline.load_lora_weights`` / ``load_lora_adapter``, i.e. PEFT) is the
independent reference for our adapted model; so is stock diffusers with the merged weights
exported through the conversion table. Import of the file, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_apex.conversion import load_diffusers_state_dict
from megatron_apex.conversion.lora_diffusers import (
    LORA_WEIGHT_NAME,
    diffusers_lora_state_dict,
    export_diffusers_lora,
    load_diffusers_lora,
    merged_diffusers_state_dict,
)
from megatron_apex.conversion.random_weights import randomize_weights_
from megatron_apex.families import build_model
from megatron_apex.families.qwen_image import config_from_diffusers
from megatron_apex.lora import LoRAConfig, apply_lora, lora_modules
from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402

TOL = 1e-5
ARCH = dict(patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=20, axes_dims_rope=(4, 6, 6))
# rank 4, alpha 8: scale 2, which the export must fold into lora_B
LORA = LoRAConfig(rank=4, alpha=8.0, targets="all,img_in,txt_in,proj_out", train_target_time_embedder=False)


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def random_diffusers(seed=5, **arch):
    torch.manual_seed(seed)
    return randomize_weights_(QwenImageTransformer2DModel(**{**ARCH, **arch}).eval(), seed + 1)


def ours_from(hf, lora=LORA, adapter_seed=None):
    model = build_model(config_from_diffusers(hf.config, target_time_embedder=False), backend="local").eval()
    load_diffusers_state_dict(model, hf.state_dict())
    apply_lora(model, lora)
    if adapter_seed is not None:
        gen = torch.Generator().manual_seed(adapter_seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_A.add_(torch.randn(m.lora_A.shape, generator=gen) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
    return model


def inputs(B=2, H=6, W=8, L=5):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, ARCH["out_channels"], H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, ARCH["joint_attention_dim"], generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    return x, t, ctx, mask


@torch.no_grad()
def diffusers_velocity(hf, x, t, ctx, mask):
    b, _, h, w = x.shape
    out = hf(hidden_states=pack_latents(x, 2), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t,
             img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
    return unpack_latents(out, h, w, 2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our adapted model, the LoRA folder, our output, stock diffusers' output without LoRA)."""
    hf = random_diffusers()
    model = ours_from(hf, adapter_seed=11)
    folder = tmp_path_factory.mktemp("lora")
    path = export_diffusers_lora(model, str(folder))
    assert path == str(folder / LORA_WEIGHT_NAME)
    with torch.no_grad():
        ours = model(*inputs())
    return model, folder, ours, diffusers_velocity(hf, *inputs())


def test_pipeline_load_lora_weights_reproduces_our_adapted_model(exported):
    _, folder, ours, base = exported
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=random_diffusers())
    pipe.load_lora_weights(str(folder))
    ref = diffusers_velocity(pipe.transformer, *inputs())
    assert (ref - base).abs().max() > 0.1  # the LoRA changes the output
    assert (ours - ref).abs().max().item() <= TOL


def test_transformer_load_lora_adapter_reproduces_our_adapted_model(exported):
    _, folder, ours, _ = exported
    hf = random_diffusers()
    hf.load_lora_adapter(str(folder / LORA_WEIGHT_NAME), prefix="transformer")
    assert (ours - diffusers_velocity(hf, *inputs())).abs().max().item() <= TOL


def test_merged_export_through_the_conversion_table_matches(exported):
    model, _, ours, _ = exported
    hf = QwenImageTransformer2DModel(**ARCH).eval()
    hf.load_state_dict(merged_diffusers_state_dict(model), strict=True)
    assert (ours - diffusers_velocity(hf, *inputs())).abs().max().item() <= TOL


def test_fused_qkv_is_split_per_projection(exported):
    model, _, _, _ = exported
    sd = diffusers_lora_state_dict(model)
    qkv = lora_modules(model)["layers.0.attention.linear_qkv"]
    h = "transformer.transformer_blocks.0.attn."
    for name in ("to_q", "to_k", "to_v"):
        assert torch.equal(sd[f"{h}{name}.lora_A.weight"], qkv.lora_A)
    # megatron's per-head layout: rows of head j are [q_j | k_j | v_j], 16 each
    B = qkv.lora_B * 2.0
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        rows = torch.cat([B[48 * head + 16 * j: 48 * head + 16 * (j + 1)] for head in range(2)])
        assert torch.equal(sd[f"{h}{name}.lora_B.weight"], rows)
    assert f"{h}to_out.0.lora_A.weight" in sd and "transformer.transformer_blocks.1.img_mod.1.lora_B.weight" in sd


def test_import_round_trips(exported):
    model, folder, ours, _ = exported
    fresh = ours_from(random_diffusers(), LoRAConfig(**{**LORA.to_dict(), "init_seed": 9}))
    loaded = load_diffusers_lora(fresh, str(folder))
    assert loaded == list(lora_modules(model))
    for name, m in lora_modules(fresh).items():
        assert torch.equal(m.lora_A, lora_modules(model)[name].lora_A)
    with torch.no_grad():
        assert (fresh(*inputs()) - ours).abs().max().item() <= TOL


def test_import_errors(exported):
    model, folder, _, _ = exported
    # (another rank, a kohya key, a missing file: tests/unit/test_bad_inputs.py, lora-file-* rows)
    path = str(folder / LORA_WEIGHT_NAME)
    wider = ours_from(random_diffusers(num_attention_heads=3, attention_head_dim=16))
    with pytest.raises(ValueError, match=r"transformer.img_in.lora_B.weight has shape \[32, 4\], the adapter on img_in "
                                         r"expects \[48, 4\]"):
        load_diffusers_lora(wider, path)

    fewer_targets = ours_from(random_diffusers(), LoRAConfig(**{**LORA.to_dict(), "targets": ("attn",)}))
    with pytest.raises(ValueError, match=r"adapts modules this model has no adapter on: transformer.img_in, "
                                         r"transformer.norm_out.linear, transformer.proj_out, "):
        load_diffusers_lora(fewer_targets, path)

    attn_only = diffusers_lora_state_dict(fewer_targets)
    everything = ours_from(random_diffusers())
    with pytest.raises(ValueError, match=r"lacks transformer.img_in.lora_A.weight, .* \(for the adapters on img_in, "
                                         r"txt_in, layers.0.img_modulation.linear, "):
        load_diffusers_lora(everything, attn_only)
    assert len(load_diffusers_lora(everything, attn_only, strict=False)) == 2 * 4

    tampered = dict(diffusers_lora_state_dict(model))
    k_key = "transformer.transformer_blocks.1.attn.to_k.lora_A.weight"
    tampered[k_key] = tampered[k_key] + 1
    with pytest.raises(ValueError, match=r"to_q.lora_A.weight, .*to_k.lora_A.weight, .*to_v.lora_A.weight differ, "
                                         r"but layers.1.attention.linear_qkv fuses them"):
        load_diffusers_lora(ours_from(random_diffusers()), tampered)


def test_export_refuses_extras_it_cannot_hold(tmp_path):
    hf = random_diffusers()
    model = build_model(config_from_diffusers(hf.config, target_time_embedder=True, shift_kind="full"),
                        backend="local").eval()
    load_diffusers_state_dict(model, hf.state_dict())
    apply_lora(model, LoRAConfig(rank=2, targets="attn"))
    with pytest.raises(ValueError, match=r"trainable target_time_embedder.linear_1.weight.* cannot go into a "
                                         r"diffusers LoRA file"):
        export_diffusers_lora(model, str(tmp_path / "out"))
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()
    path = export_diffusers_lora(model, str(tmp_path / "out"), extras="drop")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["megatron_apex_lora"])
        keys = list(f.keys())
    # the condition shift is training-only and never counts as a dropped extra
    assert meta["dropped_extras"] == [n for n, p in model.named_parameters() if n.startswith("target_time_embedder")]
    assert all(".lora_A." in k or ".lora_B." in k for k in keys) and len(keys) == 2 * 2 * 8


def test_export_follows_any_row_transform_of_the_table():
    """Families plug in through their table (Sana: 1x1 convolutions, gated rows interleaved):
    whatever the rule's transform, the exported lora_B @ lora_A of each HF module must be the
    HF-side conversion of our delta ``scale * B A`` (the table's own split of it), and the
    import must invert the export."""
    import dataclasses

    from megatron_apex.conversion.checkpoint_io import get_family
    from megatron_apex.conversion.engine import TRANSFORMS, expand

    qwen = get_family("qwen-image")
    swap = {"img_mlp.linear_fc1.weight": "conv1x1_glu_interleave", "img_mlp.linear_fc2.weight": "conv1x1",
            "txt_mlp.linear_fc1.weight": "glu_interleave"}
    swap = {k: v for k, v in swap.items() if v in TRANSFORMS}
    assert swap, "the conversion engine has none of the Sana transforms"

    def table(config):
        return [dataclasses.replace(r, transform=next((t for k, t in swap.items() if r.ours.endswith(k)), r.transform))
                for r in qwen.mapping_table(config)]

    family = dataclasses.replace(qwen, name="qwen-image-variant", mapping_table=table)
    model = ours_from(random_diffusers(), adapter_seed=4)
    sd = diffusers_lora_state_dict(model, family)
    config = model.model_config
    ctx = family.transform_context(config)
    modules = lora_modules(model)
    checked = set()
    for ours, hf_keys, rule in expand(table(config), config.num_layers):
        name = ours[: -len(".weight")]
        if not ours.endswith(".weight") or name not in modules:
            continue
        m = modules[name]
        deltas = TRANSFORMS[rule.transform][1](m.lora_scale * m.lora_B @ m.lora_A, ctx)
        for hf_key, delta in zip(hf_keys, deltas):
            A = sd[f"transformer.{hf_key[:-7]}.lora_A.weight"]
            B = sd[f"transformer.{hf_key[:-7]}.lora_B.weight"]
            assert A.shape[2:] == B.shape[2:] == delta.shape[2:]  # [*, *, 1, 1] for a 1x1 convolution
            product = B.flatten(1) @ A.flatten(1)
            assert (product - delta.flatten(1)).abs().max().item() <= 1e-5, (hf_key, rule.transform)
        checked.add(rule.transform)
    assert set(swap.values()) <= checked

    fresh = ours_from(random_diffusers(), LoRAConfig(**{**LORA.to_dict(), "init_seed": 2}))
    load_diffusers_lora(fresh, sd, family)
    for name, m in lora_modules(fresh).items():
        assert torch.equal(m.lora_A, modules[name].lora_A)
        assert (m.lora_B - modules[name].lora_B).abs().max().item() <= 1e-6
