"""Configuration of the Sana linear-attention DiT, plus the APEX extras (the same APEX
fields, meanings and defaults as ``QwenImageConfig``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_apex.models.qwen_image.config import (
    _DTYPES,
    SHIFT_KINDS,
    SHIFT_SITES,
    TARGET_TIME_INITS,
    _flag,
    gelu_tanh,
)

INIT_STYLES = ("pixart",)


@dataclass
class SanaConfig:
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

    # APEX: condition shift c_fake = A c + b applied when fake_condition is set.
    shift_site: str = "projected"  # "input": raw caption states; "projected": after caption_projection + norm
    shift_kind: str = "scalar"  # "scalar" | "diagonal" | "full"
    shift_a: float = -1.0
    shift_b: float = 0.0
    shift_learnable: Optional[bool] = None  # None: the ConditionShift default for the kind
    # APEX any-step input: e = emb(t) + emb_2(tt) * (t - tt) (the adaLN-single input).
    target_time_embedder: bool = True
    target_time_init: str = "zero"  # "zero": last linear zeroed (FM checkpoints unchanged); "copy"

    # Initialisation and precision.
    init_style: str = "pixart"
    init_std: float = 0.02  # timestep embedder, adaLN-single linear, caption projection (PixArt)
    params_dtype: str = "float32"
    use_cpu_initialization: bool = True  # same weights for every TP size
    perform_initialization: bool = True

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cross_attention_inner_dim(self) -> int:
        return self.num_cross_attention_heads * self.cross_attention_head_dim

    @property
    def ffn_hidden_size(self) -> int:
        """Channels of each GLUMBConv half (diffusers: ``int(expand_ratio * in_channels)``)."""
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    @property
    def context_dim(self) -> int:
        return self.caption_channels

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def replace(self, **overrides) -> "SanaConfig":
        """A copy with fields replaced. ``cross_attention_dim`` must equal the hidden size, so
        it follows ``num_attention_heads`` / ``attention_head_dim`` unless given (what the
        trainer's --num-attention-heads / --kv-channels need)."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"unknown SanaConfig field {key!r}; known: {sorted(known)}")
        resized = {"num_attention_heads", "attention_head_dim"} & set(overrides)
        if resized and "cross_attention_dim" not in overrides and self.cross_attention_dim == self.hidden_size:
            heads = overrides.get("num_attention_heads", self.num_attention_heads)
            head_dim = overrides.get("attention_head_dim", self.attention_head_dim)
            if isinstance(heads, int) and isinstance(head_dim, int):
                overrides = dict(overrides, cross_attention_dim=heads * head_dim)
        return dataclasses.replace(self, **overrides)

    def validate(self, tensor_model_parallel_size: int = 1) -> "SanaConfig":
        for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                     "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim",
                     "caption_channels", "sample_size", "patch_size", "timestep_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")
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
        tp = tensor_model_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"--tensor-model-parallel-size must be a positive integer, got {tp!r}")
        for what, count in (("--num-attention-heads", self.num_attention_heads),
                            ("--num-cross-attention-heads", self.num_cross_attention_heads),
                            (f"the GLUMBConv width int(--mlp-ratio x hidden) = {self.ffn_hidden_size}, i.e. it",
                             self.ffn_hidden_size)):
            if count % tp:
                raise ValueError(f"{what} ({count}) must be divisible by --tensor-model-parallel-size ({tp})")
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
            ffn_hidden_size=self.ffn_hidden_size,
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
            normalization="LayerNorm",
            layernorm_epsilon=self.norm_eps,
            apply_rope_fusion=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method=torch.nn.init.xavier_uniform_,
            output_layer_init_method=torch.nn.init.xavier_uniform_,
        )
