"""Qwen-Image dual-stream MMDiT. ``QwenImageModel`` is imported lazily (it pulls in megatron-core)."""

from megatron_apex.models.qwen_image.config import QwenImageConfig

__all__ = ["QwenImageConfig", "QwenImageModel"]


def __getattr__(name):
    if name == "QwenImageModel":
        from megatron_apex.models.qwen_image.model import QwenImageModel

        return QwenImageModel
    raise AttributeError(name)
