"""Shared pieces of the torchrun worker scripts (imported from the script's own folder)."""

import sys
from functools import partial
from pathlib import Path

import torch

# tests/integration (dist_utils) and tests/ (family_cases) for the scripts torchrun runs
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
from dist_utils import write_json_atomic  # noqa: E402,F401


def tiny_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_mlp(config, hidden, ffn, std=0.5):
    """ColumnParallelLinear -> gelu -> RowParallelLinear as a MegatronModule (biases start at 0)."""
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.core.transformer import MegatronModule

    class MLP(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            init = partial(torch.nn.init.normal_, std=std)
            self.fc1 = tensor_parallel.ColumnParallelLinear(hidden, ffn, config=config, init_method=init,
                                                            bias=True, gather_output=False)
            self.fc2 = tensor_parallel.RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=True,
                                                         input_is_parallel=True, skip_bias_add=False)

        def set_input_tensor(self, tensor):
            pass

        def forward(self, x):
            h, _ = self.fc1(x)
            y, _ = self.fc2(torch.nn.functional.gelu(h))
            return y

    return MLP()


def gather_objects(obj):
    world = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(world, obj)
    return world


def tolist(t):
    return t.detach().double().tolist()
