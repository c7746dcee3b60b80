"""PP=2: megatron's 1F1B schedule on a 4-layer stack vs the same stack run whole (PP=1).

Every rank builds all four layers from one generator and keeps its stage's two; rank 0
writes the pipeline's per-micro-batch losses and layer grads next to a plain-torch PP=1 run.
"""

import sys
from functools import partial

import torch

from _common import gather_objects, tiny_config, tolist, write_json_atomic

HIDDEN, SEQ, MICRO_BATCH, MICRO_BATCHES, LAYERS = 8, 3, 2, 4, 4


def build_layers():
    g = torch.Generator().manual_seed(99)
    layers = []
    for _ in range(LAYERS):
        layer = torch.nn.Linear(HIDDEN, HIDDEN)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=g) * 0.4)
            layer.bias.copy_(torch.randn(HIDDEN, generator=g) * 0.1)
        layers.append(layer)
    return layers


def stage_module(config, layers, first_stage):
    from megatron.core.enums import ModelType
    from megatron.core.transformer import MegatronModule

    class Stage(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.layers = torch.nn.ModuleList(layers)
            self.input_tensor = None

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

        def forward(self, x):
            h = x if first_stage else self.input_tensor
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    return Stage()


def loss_func(target, output):
    loss = (output - target).square().mean()
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    x, target = next(data_iterator)
    return model(x), partial(loss_func, target)


def main(out_path):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed

    info = init_distributed(1, 2)
    set_seed(5)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=g), torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=g))
               for _ in range(MICRO_BATCHES)]

    config = tiny_config(num_layers=LAYERS, hidden_size=HIDDEN, pipeline_model_parallel_size=2,
                         pipeline_dtype=torch.float32)
    per_stage = LAYERS // info.pp
    mine = build_layers()[info.pp_rank * per_stage:(info.pp_rank + 1) * per_stage]
    stage = stage_module(config, mine, ps.is_pipeline_first_stage()).to(info.device)
    on_device = [(x.to(info.device), target.to(info.device)) for x, target in batches]
    schedule = get_forward_backward_func()
    reports = schedule(forward_step_func=forward_step, data_iterator=iter(on_device), model=[stage],
                       num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                       forward_only=False)
    gathered = gather_objects({
        "stage": info.pp_rank,
        "losses": [r["loss"].item() for r in reports] if ps.is_pipeline_last_stage() else None,
        "grads": [[tolist(layer.weight.grad), tolist(layer.bias.grad)] for layer in mine],
    })

    # PP=1 reference: the whole stack, loss averaged over micro-batches as the schedule does.
    whole = build_layers()
    ref_losses = []
    for x, target in batches:
        h = x
        for layer in whole:
            h = torch.tanh(layer(h))
        ref_losses.append((h - target).square().mean())
    (sum(ref_losses) / MICRO_BATCHES).backward()

    if info.rank == 0:
        by_stage = sorted(gathered, key=lambda d: d["stage"])
        write_json_atomic(out_path, {
            "pp": info.pp, "schedule": schedule.__name__,
            "losses": by_stage[-1]["losses"], "ref_losses": [loss.item() for loss in ref_losses],
            "grads": [lg for d in by_stage for lg in d["grads"]],
            "ref_grads": [[tolist(layer.weight.grad), tolist(layer.bias.grad)] for layer in whole],
        })
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
