"""LoRA for the megatron-core DiTs: tensor-parallel adapters, apply/freeze, small checkpoints
tied to their base, merging (docs/lora.md). diffusers/PEFT LoRA files go through the families'
mapping tables: megatron_apex/conversion/lora_diffusers.py."""

from megatron_apex.lora.adapters import (
    LoRAMixin,
    adapter_kind,
    adapters_disabled,
    full_lora_grads,
    full_lora_weights,
    merged_weight,
    set_full_lora_weights_,
)
from megatron_apex.lora.apply import apply_lora, global_named_parameters, lora_modules, select_modules, unwrap
from megatron_apex.lora.config import PRESETS, LoRAConfig
from megatron_apex.lora.merge import merge_lora_, merged_state_dict
from megatron_apex.lora.state import (
    base_fingerprint,
    check_base_fingerprint,
    filter_trainable,
    format_parameter_summary,
    load_lora_checkpoint,
    load_trainable_state_dict,
    parameter_summary,
    read_lora_checkpoint_metadata,
    save_lora_checkpoint,
    trainable_parameters,
    trainable_sharded_state_dict,
    trainable_state_dict,
)

__all__ = [
    "LoRAConfig", "PRESETS", "LoRAMixin", "adapter_kind", "apply_lora", "select_modules", "lora_modules", "unwrap",
    "global_named_parameters", "adapters_disabled", "full_lora_weights", "full_lora_grads", "set_full_lora_weights_",
    "merged_weight", "merge_lora_", "merged_state_dict", "trainable_parameters", "trainable_state_dict",
    "load_trainable_state_dict", "filter_trainable", "trainable_sharded_state_dict", "base_fingerprint",
    "check_base_fingerprint", "save_lora_checkpoint", "load_lora_checkpoint", "read_lora_checkpoint_metadata",
    "parameter_summary", "format_parameter_summary",
]
