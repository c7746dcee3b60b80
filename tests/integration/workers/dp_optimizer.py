"""DP=2: megatron DistributedDataParallel + distributed optimizer vs one process on the global batch.

Each rank takes half of an 8-sample global batch; two Adam steps with gradient clipping.
Rank 0 writes the grad norms and both ranks' updated parameters next to a plain-torch
reference (torch.optim.Adam + clip_grad_norm_ on the whole batch).
"""

import sys

import torch

from _common import gather_objects, tiny_config, tiny_mlp, tolist, write_json_atomic

SEED, HIDDEN, FFN, GLOBAL_BATCH, STEPS, LR, CLIP = 4321, 8, 12, 8, 2, 0.05, 0.1


def main(out_path):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    info = init_distributed(1, 1)
    set_seed(SEED)
    config = tiny_config()
    mlp = tiny_mlp(config, HIDDEN, FFN).to(info.device)
    dense = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN))
    with torch.no_grad():
        for dst, src in ((dense[0], mlp.fc1), (dense[2], mlp.fc2)):
            dst.weight.copy_(src.weight.cpu())
            dst.bias.copy_(src.bias.cpu())

    ddp = DistributedDataParallel(config=config, module=mlp, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=CLIP,
                                                       use_distributed_optimizer=True), [ddp])
    config.finalize_model_grads_func = finalize_model_grads

    def forward_step(data_iterator, model):
        y = model(next(data_iterator))
        return y, lambda out: (out.square().mean(), {})

    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(GLOBAL_BATCH, HIDDEN, generator=g) for _ in range(STEPS)]
    local = GLOBAL_BATCH // info.dp
    norms = []
    for batch in batches:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mine = batch[info.dp_rank * local:(info.dp_rank + 1) * local].to(info.device)
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([mine]), model=[ddp],
                                    num_microbatches=1, seq_length=0, micro_batch_size=local, forward_only=False)
        ok, norm, _ = optimizer.step()
        assert ok
        norms.append(norm)
    params = gather_objects({name: tolist(p) for name, p in mlp.named_parameters()})

    reference = torch.optim.Adam(dense.parameters(), lr=LR)
    ref_norms = []
    for batch in batches:
        reference.zero_grad()
        dense(batch).square().mean().backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(dense.parameters(), CLIP).item())
        reference.step()

    if info.rank == 0:
        names = {"fc1.weight": dense[0].weight, "fc1.bias": dense[0].bias,
                 "fc2.weight": dense[2].weight, "fc2.bias": dense[2].bias}
        write_json_atomic(out_path, {
            "dp": info.dp, "grad_norms": norms, "ref_grad_norms": ref_norms, "params_by_rank": params,
            "ref_params": {name: tolist(p) for name, p in names.items()},
        })
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
