"""The one interface the trainer reads a training set through, whichever format holds it:
`megatron_apex.shards.v1` (shards.ShardDataset, the whole split in memory, one image shape) or
`megatron_apex.latent_shards.v1` (latent_loader.LatentShardDataset, read at offsets, one latent
shape per bucket)."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol, Tuple, runtime_checkable

from megatron_apex.data.latent_loader import LatentShardDataset, is_latent_dataset
from megatron_apex.data.shards import load_dataset


@runtime_checkable
class TrainingDataset(Protocol):
    manifest: dict
    # Damaged samples left out at start-up (logged with the metrics); None for a format that
    # refuses a damaged shard instead of skipping its samples.
    skipped: Optional[int]

    def __len__(self) -> int: ...

    def sample_shape(self, index: int) -> Tuple[int, ...]:
        """The (channels, height, width) of sample `index`: every sample of a global batch has
        the shape of its first (the batch sampler sees to that)."""

    def get_batch(self, indices) -> dict:
        """{image (B, C, H, W) float32, context (B, L, D) float32, context_mask (B, L) bool,
        label (B,) long, caption [str]} of the samples at `indices`."""

    def batch_sampler(self, global_batch_size: int, seed: int, consumed_samples: int = 0) -> Iterable[list[int]]:
        """The global batches (lists of indices) from `consumed_samples` on, a function of
        (seed, consumed_samples) alone, so that a resumed run sees an uninterrupted run's."""


def open_training_dataset(data_path: Optional[str], log: Callable[[str], None] = print) -> TrainingDataset:
    """The train split of `data_path` (None: the built-in dataset) in the format its manifest names."""
    if is_latent_dataset(data_path):
        return LatentShardDataset(data_path, log=log)
    return load_dataset(data_path, split="train")
