"""TP=2 model of a family (argv: FAMILY OUT_JSON) against single-process references.

1. Init: after set_seed(SEED) the merged TP=2 weights of the family's unit-test preset (with
   INIT_OVERRIDES) are saved; the test compares them with a TP=1 model built from the same seed.
2. Forward/backward: random diffusers weights of the family's table architecture, converted and
   sharded with the mapping table, vs diffusers' own forward and gradients (computed in this
   process, unsharded).
Rank 0 writes the numbers and each local shape; the comparison happens in the test.
"""

import os
import sys

import torch

from _common import gather_objects, write_json_atomic
from family_cases import CASES

SEED = 4321
INIT_OVERRIDES = {
    "qwen-image": dict(num_attention_heads=4, attention_head_dim=8, axes_dims_rope=[2, 2, 4], shift_kind="full",
                       target_time_init="copy"),
    # GLUMBConv width int(2.5 * 24) = 60: 30 (x, gate) channel pairs per rank.
    "sana": dict(num_attention_heads=4, attention_head_dim=6, cross_attention_dim=24, shift_kind="full",
                 target_time_init="copy", attention_bias=True),
}


def main(family, out_path):
    from megatron.core import parallel_state as ps

    from megatron_apex.conversion import hf_to_megatron, merge_tp_shards, shard_for_tp
    from megatron_apex.families import build_model, count_parameters, get_family, get_model_config
    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    case, registered = CASES[family], get_family(family)
    info = init_distributed(2, 1)
    tp_group = ps.get_tensor_model_parallel_group()

    def merged(tensors, config):
        return merge_tp_shards(gather_objects(tensors), registered.mapping_table(config), config.num_layers)

    # 1. initialisation from a seed
    config = get_model_config(case.tiny_test, **INIT_OVERRIDES[family])
    set_seed(SEED)
    model = build_model(config, backend="local")
    init = merged({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, config)
    count = count_parameters(config)

    # 2. forward + backward against diffusers
    hf = case.random_diffusers(SEED)
    config2 = registered.config_from_diffusers(hf.config, target_time_embedder=False)
    model2 = build_model(config2, backend="local")
    full = hf_to_megatron(hf.state_dict(), config2)
    local = shard_for_tp(full, registered.mapping_table(config2), config2.num_layers, info.tp_rank, info.tp)
    result = model2.load_state_dict(local, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result

    gen = torch.Generator().manual_seed(9)
    B, C, H, W, L = 3, case.arch["out_channels"], 6, 10, 5
    x, t = torch.randn(B, C, H, W, generator=gen), torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, case.context_width, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    # one valid token (an entirely padded caption is checked at TP=1: under diffusers' -10000
    # bias its float32 softmax keeps ~1e-3 of the scores, too little for 1e-5 gradient checks)
    mask[2, 1:] = 0
    weights = torch.randn(B, C, H, W, generator=gen)

    out = model2(x, t, ctx, mask)
    (out * weights).sum().backward()
    # finalize_model_grads sums these over TP (config.qk_layernorm); the rest needs nothing.
    for name, p in model2.named_parameters():
        if "q_layernorm" in name or "k_layernorm" in name:
            torch.distributed.all_reduce(p.grad, group=tp_group)
    # The dead ends (family_cases.dead_ends) get no gradient: zeros, as the test expects them.
    params = dict(model2.named_parameters())
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()}
    merged_grads = merged(grads, config2)
    replicated = gather_objects({n: g for n, g in grads.items() if not getattr(params[n], "tensor_model_parallel",
                                                                               False)})

    ref = case.velocity(hf, x, t, ctx, mask)
    (ref * weights).sum().backward()
    ref_grads = hf_to_megatron({n: torch.zeros_like(p) if p.grad is None else p.grad
                                for n, p in hf.named_parameters()}, config2)

    if info.rank == 0:
        init_path = os.path.join(os.path.dirname(out_path), "tp2_init.pt")
        torch.save(init, init_path + ".tmp")
        os.replace(init_path + ".tmp", init_path)
        write_json_atomic(out_path, {
            "tp": info.tp, "count": count, "init_path": init_path, "seed": SEED,
            "init_model": case.tiny_test, "init_overrides": INIT_OVERRIDES[family],
            "num_layers": config2.num_layers,
            "out_diff": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
            "grad_diff": {k: ((merged_grads[k] - ref_grads[k]).abs().max().item(), ref_grads[k].abs().max().item())
                          for k in ref_grads},
            "grad_keys_match": sorted(merged_grads) == sorted(ref_grads),
            "replicated_rank_diff": max((replicated[0][k] - replicated[1][k]).abs().max().item()
                                        for k in replicated[0]),
            "num_replicated": len(replicated[0]),
            "local_shapes": {n: list(p.shape) for n, p in params.items()},
        })
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
