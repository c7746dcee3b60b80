"""Datasets: built-in Fashion-MNIST/digits with MiniLM captions, webdataset shards, sampler."""

from .builtin import (build_builtin_shards, class_names, class_prompts, default_cache_dir, load_builtin_images,
                      load_idx, resolve_builtin_name)
from .sampler import GlobalBatchSampler, micro_batches
from .shards import ShardDataset, load_dataset
from .text_encoder import MiniLMTextEncoder

__all__ = ["GlobalBatchSampler", "MiniLMTextEncoder", "ShardDataset", "build_builtin_shards", "class_names",
           "class_prompts", "default_cache_dir", "load_builtin_images", "load_dataset", "load_idx",
           "micro_batches", "resolve_builtin_name"]
