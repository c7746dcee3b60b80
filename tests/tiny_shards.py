"""A tiny shard data set (the built-in format) for multi-process training tests."""

import numpy as np


def write_tiny_shards(path, context_dim: int, max_text_len: int = 4) -> None:
    """32 samples of 1 x 8 x 8 images with 1 to ``max_text_len`` text tokens ``context_dim`` wide."""
    from megatron_apex.data.shard_writer import SHARD_FORMAT, write_manifest, write_split

    rng = np.random.default_rng(0)

    def samples():
        for i in range(32):
            n = int(rng.integers(1, max_text_len + 1))
            yield dict(key=f"{i:07d}", image=rng.integers(0, 256, (1, 8, 8), dtype=np.uint8),
                       context=rng.standard_normal((n, context_dim)).astype(np.float16), mask=np.ones(n, bool),
                       caption=f"caption {i}", label=i % 4)

    write_manifest(path, dict(format=SHARD_FORMAT, splits={"train": write_split(path, "train", samples(), 32)},
                              context_dim=context_dim, max_text_len=max_text_len))
