"""DiT models on megatron-core. Importing this package stays light (no megatron import);
``build_model`` / ``count_parameters`` import megatron-core when called."""

from megatron_apex.models.qwen_image.config import QwenImageConfig
from megatron_apex.models.registry import MODEL_REGISTRY, build_model, count_parameters, get_model_config

__all__ = ["MODEL_REGISTRY", "QwenImageConfig", "build_model", "count_parameters", "get_model_config"]
