"""Configuration of the Qwen-Image dual-stream MMDiT, plus the APEX extras."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHIFT_SITES = ("input", "projected")
SHIFT_KINDS = ("scalar", "diagonal", "full")
TARGET_TIME_INITS = ("copy", "zero")
INIT_STYLES = ("dit",)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (diffusers' ``gelu-approximate``); a named function so
    configs holding it pickle."""
    return F.gelu(x, approximate="tanh")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class QwenImageConfig:
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

    # APEX: condition shift c_fake = A c + b applied when fake_condition is set.
    shift_site: str = "projected"  # "input": raw text states; "projected": after txt_in (release)
    shift_kind: str = "scalar"  # "scalar" | "diagonal" | "full"
    shift_a: float = -1.0
    shift_b: float = 0.0
    shift_learnable: Optional[bool] = None  # None: the ConditionShift default for the kind
    # APEX any-step input: temb = emb(t) + emb_2(tt) * (t - tt).
    target_time_embedder: bool = True
    target_time_init: str = "zero"  # "zero": last linear zeroed (FM checkpoints unchanged); "copy"

    # Initialisation and precision.
    init_style: str = "dit"
    init_std: float = 0.02  # timestep-embedder weights (DiT)
    params_dtype: str = "float32"
    use_cpu_initialization: bool = True  # same weights for every TP size
    perform_initialization: bool = True

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, list):
            self.axes_dims_rope = tuple(self.axes_dims_rope)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def replace(self, **overrides) -> "QwenImageConfig":
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"unknown QwenImageConfig field {key!r}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def validate(self, tensor_model_parallel_size: int = 1) -> "QwenImageConfig":
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "mlp_ratio", "timestep_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")
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
        if self.shift_site not in SHIFT_SITES:
            raise ValueError(f"--shift-site must be one of {SHIFT_SITES}, got {self.shift_site!r}")
        if self.shift_kind not in SHIFT_KINDS:
            raise ValueError(f"--shift-kind must be one of {SHIFT_KINDS}, got {self.shift_kind!r}")
        if self.target_time_init not in TARGET_TIME_INITS:
            raise ValueError(
                f"--target-time-init must be one of {TARGET_TIME_INITS}, got {self.target_time_init!r}"
            )
        if self.init_style not in INIT_STYLES:
            raise ValueError(f"--init-style must be one of {INIT_STYLES}, got {self.init_style!r}")
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"--params-dtype must be one of {tuple(_DTYPES)}, got {self.params_dtype!r}")
        if not isinstance(tensor_model_parallel_size, int) or tensor_model_parallel_size < 1:
            raise ValueError(
                f"--tensor-model-parallel-size must be a positive integer, got {tensor_model_parallel_size!r}"
            )
        if self.num_attention_heads % tensor_model_parallel_size:
            raise ValueError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--tensor-model-parallel-size ({tensor_model_parallel_size})"
            )
        return self

    def to_transformer_config(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
        """The megatron-core ``TransformerConfig`` the layers are built with."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(tensor_model_parallel_size)
        dtype = self.torch_dtype
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.attention_head_dim,
            ffn_hidden_size=self.mlp_ratio * self.hidden_size,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            # megatron-core refuses PP > 1 without the dtype of the tensors sent between stages.
            pipeline_dtype=dtype if pipeline_model_parallel_size > 1 else None,
            use_cpu_initialization=self.use_cpu_initialization,
            perform_initialization=self.perform_initialization,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            add_bias_linear=True,
            gated_linear_unit=False,
            activation_func=gelu_tanh,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            qk_layernorm=True,  # makes finalize_model_grads all-reduce the q/k norm grads over TP
            rotary_interleaved=True,
            apply_rope_fusion=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method=torch.nn.init.xavier_uniform_,
            output_layer_init_method=torch.nn.init.xavier_uniform_,
        )
