"""What the DiT configs share: the APEX fields, initialisation/precision fields, field
replacement, the checks of those fields and the megatron-core ``TransformerConfig`` the layers
are built with. Each architecture's config (``QwenImageConfig``, ``SanaConfig``) adds its own
fields, checks and TransformerConfig settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHIFT_SITES = ("input", "projected")
SHIFT_KINDS = ("scalar", "diagonal", "full")
TARGET_TIME_INITS = ("copy", "zero")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (diffusers' ``gelu-approximate``); a named function so
    configs holding it pickle."""
    return F.gelu(x, approximate="tanh")


# Fields whose trainer flag is Megatron-LM's name, not the field's.
_FLAG_OF_FIELD = {"attention_head_dim": "--kv-channels"}


def flag(name: str) -> str:
    return _FLAG_OF_FIELD.get(name, "--" + name.replace("_", "-"))


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class DiTConfig:
    # APEX: condition shift c_fake = A c + b applied when fake_condition is set; "input": the
    # raw text-encoder states, "projected": after the model's text projection (the release).
    shift_site: str = "projected"
    shift_kind: str = "scalar"  # "scalar" | "diagonal" | "full"
    shift_a: float = -1.0
    shift_b: float = 0.0
    shift_learnable: Optional[bool] = None  # None: the ConditionShift default for the kind
    # APEX any-step input: the time embedding gains emb_2(tt) * (t - tt).
    target_time_embedder: bool = True
    target_time_init: str = "zero"  # "zero": last linear zeroed (FM checkpoints unchanged); "copy"

    # Initialisation and precision.
    init_std: float = 0.02
    params_dtype: str = "float32"
    use_cpu_initialization: bool = True  # same weights for every TP size
    perform_initialization: bool = True

    # Set by each architecture.
    INIT_STYLES: ClassVar[Tuple[str, ...]] = ()
    POSITIVE_INT_FIELDS: ClassVar[Tuple[str, ...]] = ()
    # Why --sequence-parallel cannot run on this architecture (None: it can).
    SEQUENCE_PARALLEL_UNSUPPORTED: ClassVar[Optional[str]] = None

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    def _adjust_overrides(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        """Fields that follow others when those are replaced (none by default)."""
        return overrides

    def replace(self, **overrides):
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"unknown {type(self).__name__} field {key!r}; known: {sorted(known)}")
        return dataclasses.replace(self, **self._adjust_overrides(overrides))

    def _validate_shared(self, tensor_model_parallel_size) -> None:
        for name in self.POSITIVE_INT_FIELDS:
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        for name, choices in (("shift_site", SHIFT_SITES), ("shift_kind", SHIFT_KINDS),
                              ("target_time_init", TARGET_TIME_INITS), ("init_style", self.INIT_STYLES),
                              ("params_dtype", tuple(DTYPES))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{flag(name)} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("shift_a", "shift_b", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{flag(name)} must be a finite number, got {value!r}")
        if not _is_positive_int(tensor_model_parallel_size):
            raise ValueError(
                f"--tensor-model-parallel-size must be a positive integer, got {tensor_model_parallel_size!r}")

    def _transformer_settings(self) -> Dict[str, Any]:
        """The architecture's own TransformerConfig arguments (ffn size, norm type, ...)."""
        raise NotImplementedError

    def to_transformer_config(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              sequence_parallel: bool = False):
        """The megatron-core ``TransformerConfig`` the layers are built with. ``sequence_parallel``
        is a property of the run, not of the model (checkpoints do not record it)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(tensor_model_parallel_size)
        dtype = self.torch_dtype
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.attention_head_dim,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            sequence_parallel=sequence_parallel,
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
            layernorm_epsilon=self.norm_eps,
            apply_rope_fusion=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method=torch.nn.init.xavier_uniform_,
            output_layer_init_method=torch.nn.init.xavier_uniform_,
            **self._transformer_settings(),
        )
