"""adaLN modulation: ``Linear(SiLU(temb))`` split into (shift, scale, gate, ...) chunks."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron_apex.models.common.sequence_parallel import replicated_input_config, to_sequence_shards


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` in one pass over x (no x-sized temporary): on a CPU the
    elementwise passes over the activations are a visible share of a small model's forward."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + gate * update`` in one pass (see :func:`modulate`)."""
    return torch.addcmul(x, gate, update)


class AdaLNModulation(MegatronModule):
    """Projects the (already SiLU-activated) conditioning vector into ``num_chunks`` vectors.

    ``linear`` is built from the spec; the default is a ``ColumnParallelLinear`` with
    ``gather_output=True``: the 6*D x D weights (a third of Qwen-Image's parameters) are
    sharded over tensor-parallel ranks while every rank receives the full modulation.
    Chunks come back shaped (1, B, D) to broadcast over megatron's [s, b, h] layout. Under
    sequence parallelism they modulate this rank's share of the tokens: the linear does not
    gather its (per-sample) input, and the chunks' gradient is summed over TP.
    """

    def __init__(self, config, linear_spec, hidden_size: int, num_chunks: int, init_method, tp_group=None):
        super().__init__(config=config)
        self.num_chunks = num_chunks
        self.tp_group = tp_group
        self.linear = build_module(
            linear_spec,
            hidden_size,
            num_chunks * hidden_size,
            config=replicated_input_config(config),
            init_method=init_method,
            bias=True,
            gather_output=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, silu_temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, _ = self.linear(silu_temb)
        out = to_sequence_shards(out, self.config, self.tp_group)
        return tuple(c.unsqueeze(0) for c in out.chunk(self.num_chunks, dim=-1))
