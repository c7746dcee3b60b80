"""Both training-set formats through the one interface the trainer uses (data/dataset.py): the
format is told from the manifest, every sample's shape is what its batch holds, and the batch
order resumes exactly."""

import io
import itertools
import json
import tarfile

import numpy as np
import pytest

from megatron_apex.data.dataset import TrainingDataset, open_training_dataset
from megatron_apex.data.latent_loader import LatentShardDataset
from megatron_apex.data.latent_format import LATENT_FORMAT
from megatron_apex.data.shard_writer import SHARD_FORMAT, write_manifest, write_split
from megatron_apex.data.shards import ShardDataset

N, D, L = 12, 4, 3


def _pixel_shards(root):
    rng = np.random.default_rng(0)
    samples = [dict(key=f"{i:07d}", image=rng.integers(0, 256, (1, 6, 6), dtype=np.uint8),
                    context=np.ones((2, D), np.float16), caption=f"c{i}", label=i % 3) for i in range(N)]
    write_manifest(root, dict(format=SHARD_FORMAT, splits={"train": write_split(root, "train", samples, 5)},
                              max_text_len=L, context_dim=D, image_shape=[1, 6, 6]))
    return root


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _latent_shards(root):
    """Two buckets (2x4 and 4x2 latents), written with tarfile directly."""
    rng = np.random.default_rng(1)
    root.mkdir()
    grids = [(2, 4), (4, 2)]
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i in range(N):
            grid = grids[i % 2]
            members = {"latent.npy": _npy(rng.standard_normal((3, *grid)).astype(np.float16)),
                       "ctx.npy": _npy(np.ones((2, D), np.float16)), "mask.npy": _npy(np.ones(2, bool)),
                       "json": json.dumps({"latent_size": list(grid)}).encode()}
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "manifest.json").write_text(json.dumps(dict(
        format=LATENT_FORMAT, latent_channels=3, context_dim=D, max_text_len=L, buckets=[list(g) for g in grids],
        shards=[dict(name="shard-000000.tar", count=N)])))
    return root


FORMATS = {"shards": (_pixel_shards, ShardDataset, None), "latent": (_latent_shards, LatentShardDataset, 0)}


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_is_opened_as_its_reader_and_keeps_the_interface(tmp_path, kind):
    write, cls, skipped = FORMATS[kind]
    ds = open_training_dataset(str(write(tmp_path / kind)), log=lambda m: None)
    assert type(ds) is cls and isinstance(ds, TrainingDataset)
    assert len(ds) == N and ds.skipped == skipped and ds.manifest["context_dim"] == D
    for i in range(N):  # the shape the trainer draws noise for is the shape the batch holds
        assert ds.sample_shape(i) == tuple(ds.get_batch([i])["image"].shape[1:])


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_resumes_the_batch_order_of_an_uninterrupted_run(tmp_path, kind):
    ds = open_training_dataset(str(FORMATS[kind][0](tmp_path / kind)), log=lambda m: None)
    g = 4
    run = list(itertools.islice(iter(ds.batch_sampler(g, seed=5)), 7))
    resumed = list(itertools.islice(iter(ds.batch_sampler(g, seed=5, consumed_samples=3 * g)), 4))
    assert resumed == run[3:]
    for batch in run:  # every global batch has one sample shape, so one noise tensor fits it
        assert len({ds.sample_shape(i) for i in batch}) == 1
