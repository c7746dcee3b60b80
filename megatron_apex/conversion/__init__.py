"""HF <-> megatron checkpoint conversion: a generic table-driven engine applying the model
families' mapping tables (megatron_apex/families/)."""

from megatron_apex.conversion.state_dicts import hf_to_megatron, load_diffusers_state_dict, megatron_to_hf
from megatron_apex.conversion.engine import hf_to_ours, merge_tp_shards, ours_to_hf, shard_for_tp

__all__ = [
    "hf_to_ours", "ours_to_hf", "shard_for_tp", "merge_tp_shards", "hf_to_megatron", "megatron_to_hf",
    "load_diffusers_state_dict",
]
