"""``ModelFamily``: everything the rest of the code needs to know about one kind of model
(Qwen-Image, Sana), in one registered object, in the spirit of Megatron-Bridge's model
bridges: its config type and named presets, how to build it and its layer spec, how its
config and weights map to diffusers', the diffusers reference it is checked against.

Nothing here imports megatron-core, diffusers or transformers when loaded: the registry is
read by argument parsing and command-line tools; a family's model class, layer spec and
diffusers reference are imported by the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from megatron_apex.families.mapping_rules import ParamRule


@dataclass(frozen=True)
class ModelFamily:
    name: str  # tools/convert_hf.py --model
    config_class: type
    presets: Mapping[str, Callable[[], Any]]  # registry name (--model of the trainer) -> config factory
    default_model_name: str  # recorded for an imported model no preset describes
    model_class: Callable[[], type]  # the megatron model class (a function: it imports megatron-core)
    layer_spec_builder: Callable[..., Any]  # (backend, attention_backend) -> ModuleSpec of one block

    # diffusers
    diffusers_class: str
    arch_fields: Tuple[str, ...]  # config fields that config.json determines
    config_from_diffusers: Callable[..., Any]  # (config.json dict, **overrides) -> our config
    config_to_diffusers: Callable[[Any], Dict]
    mapping_table: Callable[[Any], List[ParamRule]]
    transform_context: Callable[[Any], Dict]
    target_embedder_hf: str  # diffusers name of the APEX target-time embedder (absent from stock folders)
    shift_dim: Callable[[Any], int]  # width of the condition shift (the text states it shifts)
    load_reference: Callable[[str], torch.nn.Module]  # the diffusers model of a folder
    reference_forward: Callable[..., torch.Tensor]  # (hf model, config, x, t, ctx, mask) -> velocity
    # (config, VAE downsampling factor) -> latent grid of the diffusers pipeline's default image size
    default_latent_grid: Callable[[Any, int], Tuple[int, int]]
    # config.json fields a pipeline's other components fix (latent channels, text width)
    pipeline_fields: Tuple[str, ...] = ()

    # ------------------------------------------------------------------------- configs
    def model_names(self) -> Dict[str, Callable[[], Any]]:
        return dict(self.presets)

    def config(self, name: str, **overrides):
        """The preset ``name`` with dataclass fields replaced by ``overrides``, validated."""
        config = self.presets[name]()
        if overrides:
            config = config.replace(**overrides)
        return config.validate()

    def config_from_saved(self, state: Mapping):
        """The config a checkpoint's train_state.json records (JSON lists back to tuples)."""
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()}
        return self.config(state["model_name"], **saved)

    def num_layers(self, config) -> int:
        return config.num_layers

    # ------------------------------------------------------------------------- models
    def layer_spec(self, backend: str = "auto", attention_backend: str = "auto"):
        """The ModuleSpec of one block for these backends (models/specs.py)."""
        return self.layer_spec_builder(backend, attention_backend=attention_backend)

    def build(self, config, pre_process: bool = True, post_process: bool = True, spec=None, backend: str = "auto",
              sequence_parallel: bool = False, layer_range: Optional[Tuple[int, int]] = None):
        """The model for this rank's tensor/pipeline position (megatron's parallel_state), or
        the layers ``layer_range`` = (first, stop)."""
        if spec is None:
            spec = self.layer_spec(backend)
        extra = {"sequence_parallel": True} if sequence_parallel else {}
        if layer_range is not None:
            extra["layer_range"] = layer_range
        return self.model_class()(config, spec=spec, pre_process=pre_process, post_process=post_process, **extra)

    def whole_model(self, config, backend: str = "local"):
        """Every layer in one model (TP as megatron is set up, TP=1 in the converter), on the
        current default device: what conversion and parameter counts build."""
        return self.build(config, backend=backend, layer_range=(0, self.num_layers(config)))
