"""Sana linear-attention DiT. ``SanaModel`` is imported lazily (it pulls in megatron-core)."""

from megatron_apex.models.sana.config import SanaConfig

__all__ = ["SanaConfig", "SanaModel"]


def __getattr__(name):
    if name == "SanaModel":
        from megatron_apex.models.sana.model import SanaModel

        return SanaModel
    raise AttributeError(name)
