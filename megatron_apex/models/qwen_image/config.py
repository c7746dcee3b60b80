"""Configuration of the Qwen-Image dual-stream MMDiT, plus the APEX extras (shared with Sana:
megatron_apex/models/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from megatron_apex.models.common.config import DiTConfig, gelu_tanh  # noqa: F401  (gelu_tanh: re-export)


@dataclass
class QwenImageConfig(DiTConfig):
    """Architecture (diffusers' ``QwenImageTransformer2DModel`` arguments) and APEX options.

    ``in_channels`` is the packed token width ``C * patch_size**2`` as in diffusers and
    ``out_channels`` the latent channel count ``C``: the model takes (B, C, H, W) and returns
    a velocity of the same shape.
    """

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: Tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    timestep_channels: int = 256
    init_style: str = "dit"  # init_std: the timestep-embedder weights (DiT)

    INIT_STYLES = ("dit",)
    POSITIVE_INT_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                           "num_attention_heads", "joint_attention_dim", "mlp_ratio", "timestep_channels")

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, list):
            self.axes_dims_rope = tuple(self.axes_dims_rope)

    @property
    def context_dim(self) -> int:
        return self.joint_attention_dim

    def validate(self, tensor_model_parallel_size: int = 1) -> "QwenImageConfig":
        self._validate_shared(tensor_model_parallel_size)
        p2 = self.patch_size ** 2
        if self.in_channels != self.out_channels * p2:
            raise ValueError(
                f"--in-channels ({self.in_channels}) must equal --out-channels ({self.out_channels}) "
                f"* --patch-size^2 ({p2}): the velocity has the shape of x_t"
            )
        axes = tuple(self.axes_dims_rope)
        if len(axes) != 3 or any((not isinstance(d, int)) or d < 0 or d % 2 for d in axes):
            raise ValueError(f"--axes-dims-rope must be 3 even non-negative integers, got {list(axes)}")
        if sum(axes) != self.attention_head_dim:
            raise ValueError(
                f"--axes-dims-rope {list(axes)} sums to {sum(axes)}, must equal "
                f"--attention-head-dim ({self.attention_head_dim})"
            )
        if self.num_attention_heads % tensor_model_parallel_size:
            raise ValueError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--tensor-model-parallel-size ({tensor_model_parallel_size})"
            )
        return self

    def _transformer_settings(self) -> Dict[str, Any]:
        return dict(
            ffn_hidden_size=self.mlp_ratio * self.hidden_size,
            normalization="RMSNorm",
            qk_layernorm=True,  # makes finalize_model_grads all-reduce the q/k norm grads over TP
        )
