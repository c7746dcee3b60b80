"""TP=2 QwenImageModel against single-process references.

1. Init: after set_seed(SEED) the merged TP=2 weights are saved; the test compares them
   with a TP=1 model built from the same seed.
2. Forward/backward: random diffusers weights, converted and sharded with the mapping table,
   vs diffusers' own forward and gradients (computed in this process, unsharded).
Rank 0 writes the numbers; the comparison happens in the test.
"""

import os
import sys

import torch
from megatron_apex.conversion.random_weights import randomize_weights_

from _common import gather_objects, write_json_atomic

SEED = 4321


INIT_OVERRIDES = dict(num_attention_heads=4, attention_head_dim=8, axes_dims_rope=[2, 2, 4], shift_kind="full",
                      target_time_init="copy")


def random_diffusers(seed):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    hf = QwenImageTransformer2DModel(patch_size=2, in_channels=8, out_channels=2, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                                     axes_dims_rope=(2, 2, 4))
    randomize_weights_(hf, seed + 1)
    return hf


def main(out_path):
    from megatron.core import parallel_state as ps

    from megatron_apex.conversion import hf_to_megatron, merge_tp_shards, shard_for_tp
    from megatron_apex.families.qwen_image import config_from_diffusers, qwen_image_mapping_table
    from megatron_apex.families import build_model, count_parameters
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents
    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    info = init_distributed(2, 1)
    tp_group = ps.get_tensor_model_parallel_group()

    def merged(tensors, config):
        return merge_tp_shards(gather_objects(tensors), qwen_image_mapping_table(config), config.num_layers)

    # 1. initialisation from a seed
    from megatron_apex.families import get_model_config

    config = get_model_config("qwen-image-tiny-test", **INIT_OVERRIDES)
    set_seed(SEED)
    model = build_model(config, backend="local")
    init = merged({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, config)
    count = count_parameters(config)

    # 2. forward + backward against diffusers
    hf = random_diffusers(SEED)
    config2 = config_from_diffusers(hf.config, target_time_embedder=False)
    model2 = build_model(config2, backend="local")
    full = hf_to_megatron(hf.state_dict(), config2)
    local = shard_for_tp(full, qwen_image_mapping_table(config2), config2.num_layers, info.tp_rank, info.tp)
    result = model2.load_state_dict(local, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result

    gen = torch.Generator().manual_seed(9)
    B, C, H, W, L = 3, 2, 6, 10, 5
    x, t = torch.randn(B, C, H, W, generator=gen), torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, 12, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    weights = torch.randn(B, C, H, W, generator=gen)

    out = model2(x, t, ctx, mask)
    (out * weights).sum().backward()
    # finalize_model_grads sums these over TP (config.qk_layernorm); the rest needs nothing.
    for name, p in model2.named_parameters():
        if "q_layernorm" in name or "k_layernorm" in name:
            torch.distributed.all_reduce(p.grad, group=tp_group)
    # The last block's text-stream tail gets no gradient (its output is discarded): zeros.
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model2.named_parameters()}
    merged_grads = merged(grads, config2)
    replicated = gather_objects({n: g for n, g in grads.items() if not getattr(dict(model2.named_parameters())[n],
                                                                                 "tensor_model_parallel", False)})

    tokens = pack_latents(x, 2)
    ref = hf(hidden_states=tokens, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t,
             img_shapes=[(1, H // 2, W // 2)] * B, return_dict=False)[0]
    ref = unpack_latents(ref, H, W, 2)
    (ref * weights).sum().backward()
    ref_grads = hf_to_megatron({n: torch.zeros_like(p) if p.grad is None else p.grad
                                for n, p in hf.named_parameters()}, config2)

    if info.rank == 0:
        init_path = os.path.join(os.path.dirname(out_path), "tp2_init.pt")
        torch.save(init, init_path + ".tmp")
        os.replace(init_path + ".tmp", init_path)
        grad_diff = {k: ((merged_grads[k] - ref_grads[k]).abs().max().item(), ref_grads[k].abs().max().item())
                     for k in ref_grads}
        write_json_atomic(out_path, {
            "tp": info.tp, "count": count, "init_path": init_path, "seed": SEED,
            "init_model": "qwen-image-tiny-test", "init_overrides": INIT_OVERRIDES,
            "out_diff": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
            "grad_diff": grad_diff,
            "grad_keys_match": sorted(merged_grads) == sorted(ref_grads),
            "replicated_rank_diff": max((replicated[0][k] - replicated[1][k]).abs().max().item()
                                        for k in replicated[0]),
            "num_replicated": len(replicated[0]),
        })
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
