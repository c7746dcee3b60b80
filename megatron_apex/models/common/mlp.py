"""The two-layer MLP of a transformer block: fc1 (column-parallel) -> activation -> fc2
(row-parallel), with each bias added by its linear.

megatron-core's ``MLP`` builds its linears with ``skip_bias_add=True`` so that a fused
bias+activation kernel can take the bias; on the local path there is no such kernel and the
bias becomes two extra passes over the widest activation of the block. Same submodules
(``MLPSubmodules``), parameter names and initialisation as megatron's MLP, so checkpoints and
conversion tables do not change.
"""

from __future__ import annotations

from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module


class DenseMLP(MegatronModule):
    def __init__(self, config, submodules: MLPSubmodules, ffn_hidden_size=None, tp_group=None, **_):
        super().__init__(config=config)
        hidden = config.hidden_size
        ffn = ffn_hidden_size or config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1, hidden, ffn, config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=tp_group)
        self.activation_func = config.activation_func
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, hidden, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="fc2", tp_group=tp_group)

    def forward(self, hidden_states):
        intermediate, _ = self.linear_fc1(hidden_states)
        output, _ = self.linear_fc2(self.activation_func(intermediate))
        return output, None
