"""The pipeline-stage skeleton every DiT family shares (``QwenImageModel``, ``SanaModel``).

A family's model is a ``StagedDiT``: its ``__init__`` builds its own input embeddings
(``pre_process``), this stage's blocks (``_build_layers``) and its own output head
(``post_process``), in that order; its ``forward`` reads top to bottom as diffusers' does.
What is the same for every family lives here: the megatron ``TransformerConfig`` and process
groups, which global layers this stage holds, the tensor received from the previous stage,
checkpoint keys by global layer index, the any-step time embedding and the condition-shifted
caption.

Nothing here creates a parameter or draws a random number, so the order of parameter creation
and initialisation is each family's own (checkpoints, conversion tables and seeds depend on it).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn

from megatron_apex.models.common.condition_shift import FakeCondition, apply_condition_shift
from megatron_apex.models.common.inputs import embed_any_step_time
from megatron_apex.models.common.sequence_parallel import check_sequence_parallel


def parallel_groups():
    """(tp_size, pp_size, tp_group, cp_group); sizes 1 and no groups before megatron is set up
    (enough to build the model, e.g. on the meta device; running it needs the groups)."""
    if parallel_state.model_parallel_is_initialized():
        return (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_context_parallel_group(),
        )
    return 1, 1, None, None


def stage_layers(transformer_config) -> tuple:
    """(number of layers, global index of the first) of this pipeline stage, megatron's split."""
    if transformer_config.pipeline_model_parallel_size == 1:
        return transformer_config.num_layers, 0
    return get_num_layers_to_build(transformer_config), get_transformer_layer_offset(transformer_config)


class StagedDiT(MegatronModule):
    """One pipeline stage of a DiT (see the module docstring). ``spec`` is the block's
    ModuleSpec; ``layer_range`` = (first, stop) global layer indices overrides megatron's
    per-stage split (``_build_layers``)."""

    def __init__(self, config, spec: ModuleSpec, pre_process: bool = True, post_process: bool = True,
                 sequence_parallel: bool = False):
        tp_size, pp_size, tp_group, cp_group = parallel_groups()
        config.validate(tp_size)
        if sequence_parallel:
            check_sequence_parallel(config, tp_size)
        transformer_config = config.to_transformer_config(tp_size, pp_size, sequence_parallel)
        super().__init__(config=transformer_config)
        # megatron-core's schedules read this off the model
        self.model_type = ModelType.encoder_or_decoder
        # megatron's finalize_model_grads asks whether the first and last pipeline stages hold
        # a tied weight to all-reduce; no DiT here ties one.
        self.share_embeddings_and_output_weights = False
        self.model_config = config
        self.spec = spec
        self.pre_process = pre_process
        self.post_process = post_process
        self.input_tensor = None
        self.cp_group = cp_group
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.sp_size = tp_size if sequence_parallel else 1  # ranks each stream's tokens are split over

    # ------------------------------------------------------------------ construction
    def _build_layers(self, layer_range: Optional[tuple], **layer_kwargs) -> nn.ModuleList:
        """This stage's blocks from ``self.spec``, numbered by their global index; sets
        ``num_local_layers`` and ``layer_offset``."""
        num_layers = self.model_config.num_layers
        if layer_range is None:
            self.num_local_layers, self.layer_offset = stage_layers(self.config)
        else:
            start, stop = layer_range
            if not 0 <= start <= stop <= num_layers:
                raise ValueError(f"layer_range {layer_range} must lie within [0, --num-layers={num_layers}]")
            self.num_local_layers, self.layer_offset = stop - start, start
        return nn.ModuleList([
            build_module(self.spec, config=self.config, layer_number=self.layer_offset + i + 1, **layer_kwargs)
            for i in range(self.num_local_layers)
        ])

    @torch.no_grad()
    def init_target_time_embedder(self):
        """``copy``: the first embedder's weights (the authors' release); ``zero``: the
        first's ``linear_1`` and a zero ``linear_2``, so emb_2 = 0 and a flow-matching
        checkpoint computes exactly what it did before."""
        target = self.target_time_embedder
        target.load_state_dict(self.time_embedder.state_dict())
        if self.model_config.target_time_init == "zero":
            nn.init.zeros_(target.linear_2.weight)
            nn.init.zeros_(target.linear_2.bias)

    @torch.no_grad()
    def _init_target_time_and_head(self):
        """The last replicated inits, in this order for every family: the target-time embedder
        from the (already initialised) time embedder, then a zero output head, so a fresh model
        predicts zero velocity."""
        if self.pre_process and self.model_config.target_time_embedder:
            self.init_target_time_embedder()
        if self.post_process:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    # ------------------------------------------------------------------ pipeline plumbing
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's tensor (``stage_tensor_shape``; megatron passes a list)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"{type(self).__name__} takes one input tensor per stage, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def stage_tensor_shape(self, batch_size: int, text_len: int, height: int, width: int) -> tuple:
        """Shape of the tensor this rank sends between pipeline stages (each family's own)."""
        raise NotImplementedError

    def _stage_input(self, batch_size: int, text_len: int, height: int, width: int) -> torch.Tensor:
        """The previous stage's tensor, checked against ``stage_tensor_shape``."""
        if self.input_tensor is None:
            raise RuntimeError("a non-first pipeline stage needs set_input_tensor() before forward")
        stage = self.input_tensor
        expected = self.stage_tensor_shape(batch_size, text_len, height, width)
        if tuple(stage.shape) != expected:
            raise ValueError(f"pipeline input tensor has shape {tuple(stage.shape)}, expected {expected}")
        return stage

    # ------------------------------------------------------------------ embeddings
    def _any_step_time(self, t: torch.Tensor, t_target: Optional[torch.Tensor]) -> torch.Tensor:
        """emb(t) [+ emb_2(tt) * (t - tt)] from the stage's time embedders."""
        target = self.target_time_embedder if self.model_config.target_time_embedder else None
        return embed_any_step_time(self.time_embedder, target, t, t_target)

    def _project_text(self, context: torch.Tensor) -> torch.Tensor:
        """The family's caption projection (text-encoder width -> hidden)."""
        raise NotImplementedError

    def _embed_text(self, context: torch.Tensor, fake_condition: FakeCondition) -> torch.Tensor:
        """The caption as the blocks see it, the condition shift applied at ``shift_site``:
        on the raw text-encoder states (``input``) or on the projected ones (``projected``)."""
        site = self.model_config.shift_site
        if site == "input":
            context = apply_condition_shift(self.condition_shift, context, fake_condition)
        txt = self._project_text(context)
        if site == "projected":
            txt = apply_condition_shift(self.condition_shift, txt, fake_condition)
        return txt

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Like the default, but layers are keyed by their GLOBAL index so pipeline stages
        (and re-partitionings of them) address the same checkpoint entries."""
        sharded = {}
        for name, module in self.named_children():
            if name == "layers":
                continue
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        for i, layer in enumerate(self.layers):
            sharded.update(sharded_state_dict_default(
                layer, f"{prefix}layers.{self.layer_offset + i}.", sharded_offsets, metadata
            ))
        return sharded
