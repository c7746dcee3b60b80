"""Model families: one registered ``ModelFamily`` per kind of model (families/base.py), the
registry that answers every "which family" question (families/registry.py), and the built-in
families, registered here: Qwen-Image (families/qwen_image.py) and Sana (families/sana.py).

A new family is one module defining its ``ModelFamily`` and one ``register`` call; the
trainer, the dry run and memory planner, conversion and LoRA export find it through the registry.
"""

from megatron_apex.families.base import ModelFamily
from megatron_apex.families.qwen_image import QWEN_IMAGE
from megatron_apex.families.registry import (
    build_model,
    count_parameters,
    families,
    family_names,
    family_of_config,
    family_of_folder_class,
    family_of_model_name,
    get_family,
    get_model_config,
    layer_spec,
    model_names,
    register,
    stock_class_name,
    unregister,
)
from megatron_apex.families.sana import SANA

register(QWEN_IMAGE)
register(SANA)

__all__ = [
    "ModelFamily", "QWEN_IMAGE", "SANA", "register", "unregister", "families", "family_names", "get_family",
    "family_of_config", "family_of_model_name", "family_of_folder_class", "stock_class_name", "model_names",
    "get_model_config", "build_model", "count_parameters", "layer_spec",
]
