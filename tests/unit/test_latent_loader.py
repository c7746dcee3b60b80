"""The latent_shards.v1 reader: bucket-homogeneous batches, resumable order, damaged members
skipped and named. Shards are written here with tarfile/np.save directly (an independent
writer of the format), so no encoder runs."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from megatron_apex.data.latent_loader import (BucketBatchSampler, LatentShardDataset, check_model_fits_data,
                                              is_latent_dataset)
from megatron_apex.data.latent_format import LATENT_FORMAT

C, D, L = 2, 6, 5
GRIDS = [(4, 4), (2, 8), (8, 2)]


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _sample(rng, grid, n_tokens):
    return {"latent.npy": _npy(rng.standard_normal((C, *grid)).astype(np.float16)),
            "ctx.npy": _npy(rng.standard_normal((n_tokens, D)).astype(np.float16)),
            "mask.npy": _npy(np.ones(n_tokens, dtype=bool)),
            "json": json.dumps({"latent_size": list(grid)}).encode()}


def _write(folder, shards):
    """shards: list of lists of (key, {suffix: bytes}); returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, samples in enumerate(shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for key, members in samples:
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append(dict(name=name, count=len(samples)))
    manifest = dict(format=LATENT_FORMAT, latent_channels=C, context_dim=D, max_text_len=L,
                    buckets=[list(g) for g in GRIDS], shards=entries)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _dataset(tmp_path, sizes=(10, 7, 5), per_shard=6, seed=0):
    """sizes[b] samples of GRIDS[b], interleaved, with captions naming (bucket, i)."""
    rng = np.random.default_rng(seed)
    samples, truth = [], {}
    order = [(b, i) for i in range(max(sizes)) for b in range(len(sizes)) if i < sizes[b]]
    for k, (b, i) in enumerate(order):
        members = _sample(rng, GRIDS[b], 1 + k % L)
        members["txt"] = f"{b}-{i}".encode()
        samples.append((f"{k:08d}", members))
        truth[f"{b}-{i}"] = members
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    return _write(tmp_path / "data", shards), truth


def test_batches_are_bucket_homogeneous_and_read_what_was_written(tmp_path):
    path, truth = _dataset(tmp_path)
    assert is_latent_dataset(path)
    ds = LatentShardDataset(path, log=lambda m: None)
    assert len(ds) == 22 and ds.skipped == 0
    G = 4
    sampler = iter(ds.batch_sampler(G, seed=3))
    # 10 // 4 + 7 // 4 + 5 // 4 = 4 batches an epoch
    epoch = [next(sampler) for _ in range(4)]
    flat = [i for b in epoch for i in b]
    assert len(set(flat)) == len(flat) == 16
    for batch in epoch:
        shapes = {ds.sample_shape(i) for i in batch}
        assert len(shapes) == 1
        out = ds.get_batch(batch)
        assert tuple(out["image"].shape) == (G, *shapes.pop())
        for row, caption in enumerate(out["caption"]):
            ref = truth[caption]
            lat = np.load(io.BytesIO(ref["latent.npy"])).astype(np.float32)
            ctx = np.load(io.BytesIO(ref["ctx.npy"])).astype(np.float32)
            np.testing.assert_array_equal(out["image"][row].numpy(), lat)
            # text states padded to the manifest's max length with mask False
            n = len(ctx)
            assert out["context"].shape[1:] == (L, D)
            np.testing.assert_array_equal(out["context"][row, :n].numpy(), ctx)
            assert not out["context"][row, n:].any()
            assert out["context_mask"][row].tolist() == [True] * n + [False] * (L - n)
    with pytest.raises(ValueError, match="several latent shapes"):
        ds.get_batch([epoch[0][0], next(i for i in range(len(ds)) if ds.sample_shape(i) != ds.sample_shape(
            epoch[0][0]))])


def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path):
    path, _ = _dataset(tmp_path)
    ds = LatentShardDataset(path, log=lambda m: None)
    G = 4
    run = iter(ds.batch_sampler(G, seed=7))
    uninterrupted = [next(run) for _ in range(11)]  # crosses two epoch boundaries (4 batches each)
    for k in (1, 4, 6):
        resumed = iter(ds.batch_sampler(G, seed=7, consumed_samples=k * G))
        assert [next(resumed) for _ in range(11 - k)] == uninterrupted[k:]
    # epochs differ from each other and other seeds give other orders
    assert uninterrupted[:4] != uninterrupted[4:8]
    other = iter(ds.batch_sampler(G, seed=8))
    assert [next(other) for _ in range(4)] != uninterrupted[:4]
    with pytest.raises(ValueError, match="multiple of --global-batch-size"):
        ds.batch_sampler(G, seed=7, consumed_samples=6)
    with pytest.raises(ValueError, match="larger than every aspect-ratio bucket"):
        ds.batch_sampler(11, seed=7)


def test_sampler_order_is_a_permutation_per_bucket_reference():
    # independent re-computation of epoch 0 from the documented rule
    bucket_of = np.array([0, 1, 0, 1, 0, 2, 0, 1, 0, 2])
    s = BucketBatchSampler(bucket_of, 2, seed=5)
    g = torch.Generator()
    g.manual_seed(5)
    batches = []
    for b in (0, 1, 2):
        members = np.flatnonzero(bucket_of == b)
        order = members[torch.randperm(len(members), generator=g).numpy()]
        batches += [order[k * 2:(k + 1) * 2].tolist() for k in range(len(members) // 2)]
    expected = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    it = iter(s)
    assert [next(it) for _ in range(len(expected))] == expected


def test_damaged_members_are_skipped_counted_and_named(tmp_path):
    rng = np.random.default_rng(0)
    good = [(f"{k:08d}", _sample(rng, GRIDS[0], 2)) for k in range(4)]
    bad_npy = _sample(rng, GRIDS[0], 2)
    bad_npy["latent.npy"] = b"\x93NUMPY garbage"
    truncated = _sample(rng, GRIDS[0], 2)
    truncated["ctx.npy"] = truncated["ctx.npy"][:-3]
    wrong_shape = _sample(rng, GRIDS[1], 2)
    wrong_shape["json"] = json.dumps({"latent_size": list(GRIDS[0])}).encode()
    no_mask = _sample(rng, GRIDS[0], 2)
    del no_mask["mask.npy"]
    bad = {"00000010": bad_npy, "00000011": truncated, "00000012": wrong_shape, "00000013": no_mask}
    path = _write(tmp_path / "data", [good[:2] + list(bad.items())[:2], list(bad.items())[2:] + good[2:]])
    logged = []
    ds = LatentShardDataset(path, log=logged.append)
    assert len(ds) == 4 and ds.skipped == 4
    assert sorted(ds.keys) == [k for k, _ in good]
    assert len(logged) == 4
    for key, line in zip(bad, logged):
        assert key in line and "skipped" in line
    assert "latent.npy" in logged[0] and "ctx.npy" in logged[1]
    assert "bucket" in logged[2] and "mask.npy" in logged[3]
    batch = ds.get_batch(list(range(4)))
    assert batch["image"].shape == (4, C, *GRIDS[0])


def test_no_valid_sample_is_one_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    broken = _sample(rng, GRIDS[0], 2)
    broken["latent.npy"] = b"not npy"
    path = _write(tmp_path / "empty", [[("00000000", broken)]])
    with pytest.raises(ValueError, match=r"--data-path .*empty: no valid sample") as err:
        LatentShardDataset(path, log=lambda m: None)
    assert "\n" not in str(err.value)
    missing = _write(tmp_path / "none", [[]])
    (missing / "shard-000000.tar").unlink()
    with pytest.raises(ValueError, match="no valid sample"):
        LatentShardDataset(missing, log=lambda m: None)


def test_model_data_mismatch_names_both_flags(tmp_path):
    from megatron_apex.families import get_model_config

    path, _ = _dataset(tmp_path, sizes=(4, 4, 4))
    manifest = json.loads((path / "manifest.json").read_text())
    tiny = get_model_config("qwen-image-tiny")
    with pytest.raises(ValueError, match=r"--data-path .* does not fit --model qwen-image-tiny: latent channels 2"):
        check_model_fits_data(manifest, tiny, path, "qwen-image-tiny")
    fitting = dict(manifest, latent_channels=tiny.latent_channels, context_dim=tiny.context_dim,
                   buckets=[[7, 7]], used_buckets=[[8, 8], [4, 12]])
    check_model_fits_data(fitting, tiny, path, "qwen-image-tiny")
    with pytest.raises(ValueError, match="text states width 5"):
        check_model_fits_data(dict(fitting, context_dim=5), tiny, path, "qwen-image-tiny")


def test_gzipped_shards_read_the_same_samples(tmp_path):
    import gzip

    path, _ = _dataset(tmp_path)
    plain = LatentShardDataset(path, log=lambda m: None)
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        tar = path / entry["name"]
        (path / (entry["name"] + ".gz")).write_bytes(gzip.compress(tar.read_bytes(), mtime=0))
        tar.unlink()
        entry["name"] += ".gz"
    (path / "manifest.json").write_text(json.dumps(manifest))
    gz = LatentShardDataset(path, log=lambda m: None)
    assert gz.keys == plain.keys and gz.skipped == 0
    batch = next(iter(gz.batch_sampler(4, seed=1)))
    a, b = plain.get_batch(batch), gz.get_batch(batch)
    for k in ("image", "context", "context_mask"):
        assert torch.equal(a[k], b[k])
    assert a["caption"] == b["caption"]


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    path, _ = _dataset(tmp_path, sizes=(6, 0, 0), per_shard=6)
    whole = LatentShardDataset(path, log=lambda m: None)
    shard = path / "shard-000000.tar"
    data = shard.read_bytes()
    last_key = whole.keys[-1]
    cut = data.index(f"{last_key}.ctx.npy".encode()) + 700  # inside the last sample's members
    shard.write_bytes(data[:cut])
    logged = []
    ds = LatentShardDataset(path, log=logged.append)
    assert ds.keys == whole.keys[:-1] and ds.skipped >= 1
    assert any(last_key in line for line in logged)
    a, b = whole.get_batch(range(5)), ds.get_batch(range(5))
    assert torch.equal(a["image"], b["image"])
