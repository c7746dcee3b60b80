"""Configuration of the Sana linear-attention DiT, plus the APEX extras (the same APEX
fields, meanings and defaults as ``QwenImageConfig``: megatron_apex/models/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from megatron_apex.models.common.config import DiTConfig


@dataclass
class SanaConfig(DiTConfig):
    """Architecture (diffusers' ``SanaTransformer2DModel`` arguments) and APEX options.

    Unlike Qwen-Image, ``in_channels`` is the latent channel count (the patch embedding is a
    convolution); ``out_channels`` must equal it: the model takes (B, C, H, W) and returns a
    velocity of the same shape. Class defaults are diffusers' defaults, the 1.6B model.
    """

    in_channels: int = 32
    out_channels: int = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int = 20
    cross_attention_head_dim: int = 112
    cross_attention_dim: int = 2240  # width of the projected caption: must equal hidden_size
    caption_channels: int = 2304  # text-encoder width (Gemma-2-2B)
    mlp_ratio: float = 2.5  # GLUMBConv hidden = int(mlp_ratio * hidden_size)
    attention_bias: bool = False  # bias of the self-attention q/k/v
    sample_size: int = 32  # diffusers' resolution-binning hint; no effect on the computation
    patch_size: int = 1
    norm_eps: float = 1e-6
    timestep_channels: int = 256
    init_style: str = "pixart"  # init_std: timestep embedder, adaLN-single linear, caption projection

    INIT_STYLES = ("pixart",)
    POSITIVE_INT_FIELDS = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                           "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim",
                           "caption_channels", "sample_size", "patch_size", "timestep_channels")
    SEQUENCE_PARALLEL_UNSUPPORTED = (
        "Sana models: their blocks keep activations batch-first ([batch, tokens, hidden], so the GLUMBConv "
        "reads an image in place) while megatron's sequence-parallel linears split the first dimension")

    @property
    def cross_attention_inner_dim(self) -> int:
        return self.num_cross_attention_heads * self.cross_attention_head_dim

    @property
    def ffn_hidden_size(self) -> int:
        """Channels of each GLUMBConv half (diffusers: ``int(expand_ratio * in_channels)``)."""
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def context_dim(self) -> int:
        return self.caption_channels

    def _adjust_overrides(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        # cross_attention_dim must equal the hidden size, so it follows num_attention_heads /
        # attention_head_dim unless given (what the trainer's --num-attention-heads / --kv-channels need).
        resized = {"num_attention_heads", "attention_head_dim"} & set(overrides)
        if resized and "cross_attention_dim" not in overrides and self.cross_attention_dim == self.hidden_size:
            heads = overrides.get("num_attention_heads", self.num_attention_heads)
            head_dim = overrides.get("attention_head_dim", self.attention_head_dim)
            if isinstance(heads, int) and isinstance(head_dim, int):
                overrides = dict(overrides, cross_attention_dim=heads * head_dim)
        return overrides

    def validate(self, tensor_model_parallel_size: int = 1) -> "SanaConfig":
        self._validate_shared(tensor_model_parallel_size)
        if self.out_channels != self.in_channels:
            raise ValueError(
                f"--out-channels ({self.out_channels}) must equal --in-channels ({self.in_channels}): "
                "the velocity has the shape of x_t"
            )
        if self.cross_attention_dim != self.hidden_size:
            raise ValueError(
                f"--cross-attention-dim ({self.cross_attention_dim}) must equal the hidden size "
                f"--num-attention-heads x --attention-head-dim ({self.hidden_size}): the caption is "
                "projected to the hidden size before the cross-attention"
            )
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or \
                self.ffn_hidden_size < 1:
            raise ValueError(f"--mlp-ratio must be a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"--attention-bias must be true or false, got {self.attention_bias!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"--norm-eps must be positive, got {self.norm_eps!r}")
        tp = tensor_model_parallel_size
        for what, count in (("--num-attention-heads", self.num_attention_heads),
                            ("--num-cross-attention-heads", self.num_cross_attention_heads),
                            (f"the GLUMBConv width int(--mlp-ratio x hidden) = {self.ffn_hidden_size}, i.e. it",
                             self.ffn_hidden_size)):
            if count % tp:
                raise ValueError(f"{what} ({count}) must be divisible by --tensor-model-parallel-size ({tp})")
        return self

    def _transformer_settings(self) -> Dict[str, Any]:
        return dict(ffn_hidden_size=self.ffn_hidden_size, normalization="LayerNorm")
