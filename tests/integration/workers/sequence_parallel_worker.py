"""TP=2 QwenImageModel with and without sequence parallelism, in the same two processes.

Both models get the same local weights on each rank (every parameter, replicated or this
rank's shard, filled from a generator keyed by its name), are wrapped in megatron's DDP and
run the same forward and backward on inputs whose caption length (5) is odd, so the
sequence-parallel model pads it. Gradients are read from megatron's main_grad buffers before
and after megatron's own finalize_model_grads. Rank r writes its numbers to OUT.rank<r>.json;
the comparisons happen in the test.
"""

import sys
import zlib

import torch

from _common import write_json_atomic


def fill_(model):
    """Every parameter from a generator keyed by its name: the same on every rank for a
    replicated one, the same shard for the same rank in both models."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def wrapped(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), module=model)


def inputs():
    g = torch.Generator().manual_seed(3)
    B, L = 2, 5
    x = torch.randn(B, 1, 8, 8, generator=g)  # 4 x 4 patches = 16 image tokens
    t = torch.rand(B, generator=g)
    context = torch.randn(B, L, 24, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    weights = torch.randn(B, 1, 8, 8, generator=g)
    return x, t, context, mask, weights


def main(out_path):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from megatron_apex.families import build_model, get_model_config
    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    info = init_distributed(2, 1)
    config = get_model_config("qwen-image-tiny-test")
    x, t, context, mask, weights = inputs()
    result = {"rank": info.rank, "tp_rank": ps.get_tensor_model_parallel_rank()}
    for sp in (False, True):
        set_seed(11)
        model = build_model(config, backend="local", sequence_parallel=sp)
        fill_(model)
        seen = []  # the image-stream tokens each block holds
        for layer in model.layers:
            layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
        ddp = wrapped(model)
        # an any-step target time (so the target-time embedder gets a gradient) and the shifted
        # condition on one row
        out = ddp(x, t, context, mask, fake_condition=torch.tensor([False, True]), t_target=t * 0.5)
        (out * weights).sum().backward()
        params = dict(model.named_parameters())
        before = {n: p.main_grad.clone() for n, p in params.items()}
        finalize_model_grads([ddp])
        after = {n: p.main_grad.clone() for n, p in params.items()}
        tag = "sp" if sp else "tp"
        result[tag] = {
            "out": out.detach().flatten().tolist(),
            # no caption mask: under sequence parallelism the padding alone makes one
            "no_mask_out": ddp(x, t, context, None).detach().flatten().tolist(),
            "image_tokens_per_block": seen[:config.num_layers],
            "before": {n: g.flatten().tolist() for n, g in before.items()},
            "after": {n: g.flatten().tolist() for n, g in after.items()},
            "replicated": sorted(n for n, p in params.items() if not getattr(p, "tensor_model_parallel", False)),
            "marked": sorted(n for n, p in params.items() if getattr(p, "sequence_parallel", False)),
        }
        if sp:
            try:  # 3 x 5 patches: 15 image tokens do not split over 2 ranks
                model(torch.randn(1, 1, 6, 10), torch.rand(1), context[:1], mask[:1])
                result["odd_grid_error"] = None
            except ValueError as err:
                result["odd_grid_error"] = str(err)
    write_json_atomic(f"{out_path}.rank{info.rank}.json", result)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
