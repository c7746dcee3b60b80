"""HF <-> megatron checkpoint conversion: a generic table-driven engine and per-family tables."""

from megatron_apex.conversion.engine import ParamRule, hf_to_ours, merge_tp_shards, ours_to_hf, shard_for_tp
from megatron_apex.conversion.qwen_image_mapping import (
    config_from_diffusers,
    hf_to_megatron,
    load_diffusers_state_dict,
    megatron_to_hf,
    qwen_image_mapping_table,
)

__all__ = [
    "ParamRule", "hf_to_ours", "ours_to_hf", "shard_for_tp", "merge_tp_shards",
    "qwen_image_mapping_table", "hf_to_megatron", "megatron_to_hf", "load_diffusers_state_dict",
    "config_from_diffusers",
]
