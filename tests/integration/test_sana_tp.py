"""SanaModel with tensor parallelism 2 (two gloo processes, this file run under torchrun)
against single-process references: diffusers' forward and gradients, and the TP=1
initialisation from the same seed.

The worker, per rank:
1. after set_seed(SEED) builds sana-tiny-test at TP=2; the merged weights are saved, the test
   compares them with a TP=1 model built from the same seed;
2. loads random diffusers weights converted and sharded with the mapping table and runs
   forward + backward; diffusers' own forward and gradients (unsharded, computed in the same
   process) are the reference. Rank 0 writes the numbers; the comparison happens in the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

SEED = 4321
# GLUMBConv width int(2.5 * 24) = 60: 30 (x, gate) channel pairs per rank.
INIT_OVERRIDES = dict(num_attention_heads=4, attention_head_dim=6, cross_attention_dim=24, shift_kind="full",
                      target_time_init="copy", attention_bias=True)
ARCH = dict(in_channels=2, out_channels=2, num_attention_heads=4, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=32, caption_channels=12,
            sample_size=8, patch_size=2)


def worker(out_path: str) -> None:
    import torch.distributed as dist
    from diffusers import SanaTransformer2DModel

    from megatron_apex.conversion import hf_to_megatron, merge_tp_shards, shard_for_tp
    from megatron_apex.conversion.random_weights import randomize_weights_
    from megatron_apex.families import build_model, count_parameters, get_model_config
    from megatron_apex.families import sana as sm
    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    info = init_distributed(2, 1)

    def gathered(obj):
        world = [None] * dist.get_world_size()
        dist.all_gather_object(world, obj)
        return world

    def merged(tensors, config):
        return merge_tp_shards(gathered(tensors), sm.sana_mapping_table(config), config.num_layers)

    # 1. initialisation from a seed
    config = get_model_config("sana-tiny-test", **INIT_OVERRIDES)
    set_seed(SEED)
    model = build_model(config, backend="local")
    init = merged({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, config)
    count = count_parameters(config)

    # 2. forward + backward against diffusers
    torch.manual_seed(SEED)
    hf = SanaTransformer2DModel(**ARCH)
    randomize_weights_(hf, SEED + 1)
    config2 = sm.config_from_diffusers(hf.config, target_time_embedder=False)
    model2 = build_model(config2, backend="local")
    full = hf_to_megatron(hf.state_dict(), config2)
    local = shard_for_tp(full, sm.sana_mapping_table(config2), config2.num_layers, info.tp_rank, info.tp)
    result = model2.load_state_dict(local, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result

    gen = torch.Generator().manual_seed(9)
    B, C, H, W, L = 3, 2, 6, 10, 5
    x, t = torch.randn(B, C, H, W, generator=gen), torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, 12, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    # one valid token (an entirely padded caption is checked at TP=1: under diffusers' -10000
    # bias its float32 softmax keeps ~1e-3 of the scores, too little for 1e-5 gradient checks)
    mask[2, 1:] = 0
    weights = torch.randn(B, C, H, W, generator=gen)

    out = model2(x, t, ctx, mask)
    (out * weights).sum().backward()
    params = dict(model2.named_parameters())
    grads = {n: p.grad for n, p in params.items()}
    merged_grads = merged(grads, config2)
    replicated = gathered({n: g for n, g in grads.items() if not getattr(params[n], "tensor_model_parallel", False)})
    local_shapes = {n: list(p.shape) for n, p in params.items()}

    ref = hf(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t * 1000,
             return_dict=False)[0]
    (ref * weights).sum().backward()
    ref_grads = hf_to_megatron({n: p.grad for n, p in hf.named_parameters()}, config2)

    if info.rank == 0:
        init_path = os.path.join(os.path.dirname(out_path), "tp2_init.pt")
        torch.save(init, init_path + ".tmp")
        os.replace(init_path + ".tmp", init_path)
        payload = {
            "tp": info.tp, "count": count, "init_path": init_path,
            "out_diff": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
            "grad_diff": {k: ((merged_grads[k] - ref_grads[k]).abs().max().item(), ref_grads[k].abs().max().item())
                          for k in ref_grads},
            "grad_keys_match": sorted(merged_grads) == sorted(ref_grads),
            "replicated_rank_diff": max((replicated[0][k] - replicated[1][k]).abs().max().item()
                                        for k in replicated[0]),
            "num_replicated": len(replicated[0]),
            "local_shapes": local_shapes,
        }
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, out_path)
    destroy_distributed()


def test_tp2_equals_single_process(tmp_path):
    pytest.importorskip("diffusers")
    from dist_utils import run_torchrun

    out = tmp_path / "sana_tp.json"
    run_torchrun(Path(__file__), 2, ["--worker", out], timeout=240)
    r = json.loads(out.read_text())
    assert r["tp"] == 2

    # each rank holds half of every split tensor: heads, and (x, gate) pairs of the GLUMBConv
    shapes = r["local_shapes"]
    assert shapes["layers.0.attention.linear_qkv.weight"] == [3 * 32 // 2, 32]
    assert shapes["layers.0.cross_attention.linear_k.weight"] == [24 // 2, 32]
    assert shapes["layers.0.mlp.linear_fc1.weight"] == [2 * 80 // 2, 32]
    assert shapes["layers.0.mlp.depthwise.weight"] == [2 * 80 // 2, 1, 3, 3]
    assert shapes["layers.0.mlp.linear_fc2.weight"] == [32, 80 // 2]

    # forward and gradients vs diffusers
    assert r["ref_max"] > 0.1
    assert r["out_diff"] <= 1e-5
    assert r["grad_keys_match"]
    for key, (diff, scale) in r["grad_diff"].items():
        assert scale > 0, key
        assert diff <= 1e-5 * max(1.0, scale), (key, diff, scale)
    assert r["num_replicated"] > 0 and r["replicated_rank_diff"] <= 1e-6

    # the same seed gives the same full weights for TP=1 and TP=2
    from megatron_apex.families import build_model, count_parameters, get_model_config
    from megatron_apex.parallel import init_distributed, set_seed

    init_distributed(1, 1)
    config = get_model_config("sana-tiny-test", **INIT_OVERRIDES)
    set_seed(SEED)
    single = {k: v for k, v in build_model(config, backend="local").state_dict().items()
              if not k.endswith("_extra_state")}
    tp2 = torch.load(r["init_path"])
    assert tp2.keys() == single.keys()
    assert all(torch.equal(tp2[k], single[k]) for k in single)
    assert r["count"] == count_parameters(config) == sum(v.numel() for v in single.values())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit("usage: test_sana_tp.py --worker OUT_JSON")
