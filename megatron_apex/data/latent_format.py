"""The names and index columns of `megatron_apex.latent_shards.v1`: what its writer
(megatron_apex/data/prepare/) and its reader (megatron_apex/data/latent_loader.py) agree on.
The folder layout and the per-sample members are described in megatron_apex/data/prepare/__init__.py.
"""

from __future__ import annotations

LATENT_FORMAT = "megatron_apex.latent_shards.v1"
MANIFEST_NAME = "manifest.json"
# member suffixes of one sample, in the order they are written
MEMBERS = ("latent.npy", "ctx.npy", "mask.npy", "txt", "json")


def shard_names(index: int, compress: bool) -> tuple[str, str]:
    return f"shard-{index:06d}.tar" + (".gz" if compress else ""), f"shard-{index:06d}.json"


def index_name(index: int) -> str:
    return f"shard-{index:06d}.idx.npy"


# columns of a shard's index (shard-NNNNNN.idx.npy, int64, one row per sample in tar order):
# the key, then (offset, size) of the latent, ctx and mask payloads (past their .npy headers) and
# of the txt member, in the uncompressed tar stream; the latent and ctx itemsizes; the number of
# text tokens; the latent grid (h, w)
INDEX_COLUMNS = ("key", "latent_offset", "latent_size", "ctx_offset", "ctx_size", "mask_offset", "mask_size",
                 "txt_offset", "txt_size", "latent_itemsize", "ctx_itemsize", "tokens", "grid_h", "grid_w")

