"""megatron-core's tensor-parallel linears with the bias added inside the matmul.

megatron-core's local linears multiply in their autograd function and add the bias as a
separate elementwise pass over the output; diffusers' ``nn.Linear`` does both in one
``addmm``. On a CPU that extra pass is ~15% of a small model's forward. These subclasses take
the one-call path wherever it is exactly equivalent (same partitioning, same communication,
the bias where megatron puts it) and defer to megatron-core everywhere else: sequence
parallelism, gradient-accumulation fusion, expert layers, skip_bias_add, an external weight,
and a row-parallel layer at TP > 1 (its bias must follow the all-reduce). At TP=1 the column
layer also skips megatron's copy/gather autograd functions: identities there, but two Python
autograd calls per linear, measurable in a small model's CPU forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_tensor_model_parallel_region)


def _plain_path(layer) -> bool:
    config = layer.config
    return (layer.bias is not None and not layer.skip_bias_add and not layer.sequence_parallel
            and not layer.gradient_accumulation_fusion and not layer.explicit_expert_comm
            and not config.defer_embedding_wgrad_compute and config._cpu_offloading_context is None)


class FusedBiasColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        if weight is not None or self.disable_grad_reduce or not _plain_path(self):
            return super().forward(input_, weight, runtime_gather_output)
        if self.tp_group.size() == 1:  # the two mappings below are identities, forward and backward
            return F.linear(input_, self.weight, self.bias), None
        # identity forward, all-reduce of the input gradient over TP in the backward: what
        # megatron's autograd function does for a column-parallel layer
        x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        out = F.linear(x, self.weight, self.bias)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, None


class FusedBiasRowParallelLinear(RowParallelLinear):
    def forward(self, input_: torch.Tensor):
        if self.tp_group.size() > 1 or not _plain_path(self):
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None
