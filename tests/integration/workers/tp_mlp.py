"""TP=2: ColumnParallel -> RowParallel MLP vs the dense computation from the same seed.

Writes (rank 0) the TP result and a dense reference built from a fresh generator seeded like
set_seed: with use_cpu_initialization megatron draws each full weight then keeps a slice.
"""

import sys

import torch

from _common import gather_objects, tiny_config, tiny_mlp, tolist, write_json_atomic

SEED, HIDDEN, FFN, STD = 1234, 8, 12, 0.5


def main(out_path):
    from megatron.core import tensor_parallel

    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    info = init_distributed(2, 1)
    set_seed(SEED)
    mlp = tiny_mlp(tiny_config(), HIDDEN, FFN, STD).to(info.device)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(7))
    y = mlp(x.to(info.device))
    y.square().sum().backward()

    # gather_output=True all-gathers the column shards (needs torch.cuda.current_device on CPU).
    set_seed(SEED)
    column = tensor_parallel.ColumnParallelLinear(HIDDEN, FFN, config=tiny_config(), bias=False,
                                                  init_method=lambda w: torch.nn.init.normal_(w, std=STD),
                                                  gather_output=True).to(info.device)
    gathered = column(x.to(info.device))[0]

    shards = gather_objects({"fc1": tolist(mlp.fc1.weight.grad), "fc2": tolist(mlp.fc2.weight.grad)})

    g = torch.Generator().manual_seed(SEED)
    w1 = torch.empty(FFN, HIDDEN).normal_(0, STD, generator=g).requires_grad_()
    w2 = torch.empty(HIDDEN, FFN).normal_(0, STD, generator=g).requires_grad_()
    ref = torch.nn.functional.gelu(x @ w1.t()) @ w2.t()
    ref.square().sum().backward()

    if info.rank == 0:
        write_json_atomic(out_path, {
            "tp": info.tp, "dp": info.dp,
            "output": tolist(y), "dense_output": tolist(ref),
            "gathered_fc1": tolist(gathered), "dense_fc1": tolist(x @ w1.t()),
            "grad_fc1": [row for s in shards for row in s["fc1"]],  # column shards stack on dim 0
            "grad_fc2": [sum((s["fc2"][r] for s in shards), []) for r in range(HIDDEN)],  # rows on dim 1
            "dense_grad_fc1": tolist(w1.grad), "dense_grad_fc2": tolist(w2.grad),
        })
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
