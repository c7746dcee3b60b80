"""The one registry of model families: a family exists for the rest of the code only once it is
registered here, and every question about "which family" (a preset name, a config, a diffusers
class) is answered by looking it up.

Light to import: megatron-core is imported when a model is built or counted.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from megatron_apex import gpu
from megatron_apex.families.base import ModelFamily

_FAMILIES: Dict[str, ModelFamily] = {}
# What a folder saved by one of our APEX diffusers classes names (megatron_apex.inference.
# diffusers_apex: ``Apex<stock class>``): it converts as its stock class, same keys plus extras.
_APEX_PREFIX = "Apex"


def _clashes(family: ModelFamily, other: ModelFamily) -> List[str]:
    shared = sorted(set(family.presets) & set(other.presets))
    clashes = [f"model names {shared}"] if shared else []
    if family.config_class is other.config_class:
        clashes.append(f"config class {family.config_class.__name__}")
    if family.diffusers_class == other.diffusers_class:
        clashes.append(f"diffusers class {family.diffusers_class}")
    return clashes


def register(family: ModelFamily) -> ModelFamily:
    """Add ``family``; its name, preset names, config class and diffusers class must be its own."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    if family.default_model_name not in family.presets:
        raise ValueError(f"model family {family.name!r}: default model {family.default_model_name!r} is not "
                         "one of its presets")
    for other in _FAMILIES.values():
        clashes = _clashes(family, other)
        if clashes:
            raise ValueError(f"model family {family.name!r} shares {', '.join(clashes)} with {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> ModelFamily:
    """Remove a registered family (tests that register one of their own)."""
    return _FAMILIES.pop(name)


def families() -> List[ModelFamily]:
    return list(_FAMILIES.values())


def family_names() -> List[str]:
    return list(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_of_config(config) -> ModelFamily:
    """The family whose config class ``config`` is an instance of (exactly: a subclass is
    another architecture)."""
    for family in _FAMILIES.values():
        if type(config) is family.config_class:
            return family
    known = ", ".join(family.config_class.__name__ for family in _FAMILIES.values())
    raise ValueError(f"no model family for a config of type {type(config).__name__}; known: {known}")


def model_names() -> List[str]:
    """Every registered preset name (the trainer's --model)."""
    return [name for family in _FAMILIES.values() for name in family.presets]


def family_of_model_name(name: str) -> ModelFamily:
    for family in _FAMILIES.values():
        if name in family.presets:
            return family
    raise ValueError(f"unknown --model {name!r}; known models: {', '.join(sorted(model_names()))}")


def stock_class_name(class_name):
    """The stock diffusers class a folder's ``_class_name`` converts as (``Apex<stock>`` -> stock)."""
    if isinstance(class_name, str) and class_name.startswith(_APEX_PREFIX):
        return class_name[len(_APEX_PREFIX):]
    return class_name


def family_of_folder_class(class_name) -> Optional[ModelFamily]:
    """The family whose diffusers class a folder's config.json ``_class_name`` names, or None."""
    found = stock_class_name(class_name)
    return next((family for family in _FAMILIES.values() if family.diffusers_class == found), None)


# ============================================================================ configs and models
def get_model_config(name: str, **overrides):
    """The registered config ``name`` with dataclass fields replaced by ``overrides``."""
    return family_of_model_name(name).config(name, **overrides)


def _config_of(config: Union[Any, str]):
    return get_model_config(config) if isinstance(config, str) else config


def build_model(config, pre_process: bool = True, post_process: bool = True, spec=None, backend: str = "auto",
                sequence_parallel: bool = False):
    """Build the model for this rank's tensor/pipeline position (megatron's parallel_state);
    ``sequence_parallel``: Megatron-LM's --sequence-parallel (TP > 1, Qwen-Image)."""
    config = _config_of(config)
    return family_of_config(config).build(config, pre_process=pre_process, post_process=post_process, spec=spec,
                                          backend=backend, sequence_parallel=sequence_parallel)


def count_parameters(config, backend: str = "local") -> int:
    """Parameters of the WHOLE model (all stages, unsharded), built on the meta device.

    Tensor-parallel shards are counted times the TP size, so the answer does not depend on
    how megatron is set up in this process (or whether it is at all).
    """
    from megatron.core import parallel_state

    config = _config_of(config)
    family = family_of_config(config)
    initialized = parallel_state.model_parallel_is_initialized()
    tp = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
    # Initialisation stays on: on meta it costs nothing, and it is what marks megatron's
    # weights as tensor-parallel.
    with torch.device("meta"):
        model = family.whole_model(config, backend=backend)
    return sum(param.numel() * (tp if getattr(param, "tensor_model_parallel", False) else 1)
               for param in model.parameters())


def layer_spec(config, options):
    """The layer spec of ``config``'s family for the resolved GPU options (megatron_apex.gpu;
    pass it to ``build_model(config, spec=...)``). With TE's core attention it also sets the
    NVTE_* variables that pick TE's attention kernel, as megatron's LanguageModule does."""
    if options.transformer_impl == "auto":
        raise ValueError("layer_spec needs resolved options (gpu_options_from_args / resolve_gpu_options)")
    if options.te_core_attention:
        gpu.set_te_attention_environment(options.attention_backend)
    return family_of_config(config).layer_spec(options.spec_backend, attention_backend=options.attention_backend)

