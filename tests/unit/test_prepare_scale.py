"""prepare_data at scale: the per-shard index the loader starts from instead of the tar headers
(and its fallbacks), the encoders' device and dtype flags, real batching, the progress bar."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from tiny_vaes import tiny_vae

from megatron_apex.data.latent_loader import LatentShardDataset, _Shard
from megatron_apex.data.prepare import PrepareConfig, prepare

SIZES = [(28, 28), (20, 40), (40, 20), (24, 32), (30, 26)]


def _images(folder, n=11, rgb=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        shape = (h, w, 3) if rgb else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:03d}.png")
        if i != 3:
            (folder / f"{i:03d}.txt").write_text(f"picture {i}" + " more" * i)
    return folder


def _cfg(inputs, output, **kw):
    base = dict(vae="none", channels=1, resolution=28, patch_size=4, max_text_len=8, samples_per_shard=4,
                progress=False, device="cpu")
    return PrepareConfig(inputs=[str(inputs)], output=str(output), **{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    inputs = _images(root / "in")
    out = {}
    for compress in (False, True):
        out[compress] = root / f"out-{compress}"
        prepare(_cfg(inputs, out[compress], compress=compress), log=lambda m: None)
    return out


def _without_index(src, dst):
    """A copy of a prepared folder whose manifest names no index: the loader scans it."""
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((dst / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["sample_index"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("compress", [False, True])
def test_the_index_gives_the_samples_of_the_header_scan_without_reading_a_header(prepared, tmp_path,
                                                                                 monkeypatch, compress):
    scanned = LatentShardDataset(_without_index(prepared[compress], tmp_path / "scan"), log=lambda m: None)
    assert scanned.indexed_shards == 0 and len(scanned) == 10  # 11 inputs, one without a caption

    def no_header_reads(self):
        raise AssertionError("a tar header was read")

    monkeypatch.setattr(_Shard, "members", no_header_reads)
    logs = []
    indexed = LatentShardDataset(prepared[compress], log=logs.append)
    assert indexed.indexed_shards == 3 and not logs
    assert indexed.keys == scanned.keys and indexed.grids == scanned.grids
    np.testing.assert_array_equal(indexed.shard_of, scanned.shard_of)
    np.testing.assert_array_equal(indexed.bucket_of, scanned.bucket_of)
    np.testing.assert_array_equal(indexed.offsets, scanned.offsets)
    for bucket in range(len(indexed.grids)):
        members = np.flatnonzero(indexed.bucket_of == bucket).tolist()
        got, ref = indexed.get_batch(members), scanned.get_batch(members)
        for name in ("image", "context", "context_mask"):
            assert (got[name] == ref[name]).all()
        assert got["caption"] == ref["caption"]


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _set_index(folder, shard, rows):
    """Replace a shard's index with `rows` and record it in the manifest as prepare_data would."""
    import hashlib

    buf = io.BytesIO()
    np.save(buf, rows)
    (folder / f"shard-{shard:06d}.idx.npy").write_bytes(buf.getvalue())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][shard]["sample_index"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _damage(kind, folder):
    index = folder / "shard-000001.idx.npy"
    rows = np.load(index)
    if kind == "missing":
        index.unlink()
    elif kind == "other bytes":
        index.write_bytes(index.read_bytes()[:-8] + b"\0" * 8)
    elif kind == "truncated shard":
        tar = folder / "shard-000001.tar"
        tar.write_bytes(tar.read_bytes()[:int(rows[-1, 1]) + 10])  # the last sample loses its latent
    elif kind == "offset past the end":
        rows[-1, 1] = 10 ** 9
        _set_index(folder, 1, rows)
    elif kind == "grid not a bucket":
        rows[0, 12] += 1
        _set_index(folder, 1, rows)
    elif kind == "too many tokens":
        rows[0, 11] = 99
        _set_index(folder, 1, rows)


@pytest.mark.parametrize("kind", ["missing", "other bytes", "truncated shard", "offset past the end",
                                  "grid not a bucket", "too many tokens"])
def test_an_unusable_index_is_named_and_its_shard_scanned(prepared, tmp_path, kind):
    folder = _copy(prepared[False], tmp_path / "data")
    _damage(kind, folder)
    logs = []
    ds = LatentShardDataset(folder, log=logs.append)
    assert ds.indexed_shards == 2
    assert any("shard-000001.tar: index not used" in line for line in logs), logs
    reference = LatentShardDataset(_without_index(prepared[False], tmp_path / "scan"), log=lambda m: None)
    if kind == "truncated shard":  # the scan keeps the samples before the cut, and names the lost one
        assert ds.skipped == 1 and ds.keys == [k for k in reference.keys if k != ds.bad_members[0].split(":")[1]]
    else:
        assert ds.keys == reference.keys and ds.skipped == 0
        np.testing.assert_array_equal(ds.offsets, reference.offsets)


def test_a_rerun_rebuilds_a_shard_whose_index_is_missing(tmp_path):
    inputs = _images(tmp_path / "in", n=6)
    out = tmp_path / "out"
    prepare(_cfg(inputs, out), log=lambda m: None)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "shard-000000.idx.npy").unlink()
    summary = prepare(_cfg(inputs, out), log=lambda m: None)
    assert (summary["shards_written"], summary["shards_kept"]) == (1, 1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


# ------------------------------------------------------------------------------ devices, dtypes, batches

def test_bad_device_dtype_and_decoder_are_one_line_errors(tmp_path):
    import torch

    from megatron_apex.data.prepare import resolve_decoder, resolve_device, resolve_dtype

    with pytest.raises(ValueError, match=r"^--device gpu: expected cpu, cuda or cuda:N$"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda:1: CUDA is not available on this machine$"):
            resolve_device("cuda:1")
        assert resolve_device("auto") == "cpu" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda:3") == "bfloat16"
    with pytest.raises(ValueError, match=r"^--dtype float16: expected float32 or bfloat16$"):
        resolve_dtype("float16", "cpu")
    assert resolve_decoder("auto", "cpu") == "pil"
    with pytest.raises(ValueError, match=r"^--decoder jpeg: expected pil, dali or auto$"):
        resolve_decoder("jpeg", "cpu")
    with pytest.raises(ValueError, match=r"^--max-text-len must be a positive integer, got 0$"):
        prepare(_cfg(tmp_path / "in", tmp_path / "out", max_text_len=0))


def test_bfloat16_reaches_the_vae_and_is_part_of_the_settings(tmp_path):
    """--dtype bfloat16: the latents are the VAE's in bfloat16 (close to, not equal to, float32's),
    the manifest says so, and a float32 rerun into the same folder is refused."""
    import torch

    tiny_vae("AutoencoderKL").save_pretrained(tmp_path / "vae")
    inputs = _images(tmp_path / "in", n=3, rgb=True)
    kw = dict(vae=str(tmp_path / "vae"), channels=3, resolution=16, patch_size=2, samples_per_shard=10)
    prepare(_cfg(inputs, tmp_path / "bf16", dtype="bfloat16", **kw), log=lambda m: None)
    prepare(_cfg(inputs, tmp_path / "fp32", **kw), log=lambda m: None)
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["encoded_with"] == {"device": "cpu", "dtype": "bfloat16", "decoder": "pil"}
    got = LatentShardDataset(tmp_path / "bf16", log=lambda m: None)
    ref = LatentShardDataset(tmp_path / "fp32", log=lambda m: None)
    assert len(ref) == len(got) == 3
    for i in range(len(ref)):
        a, b = got.get_batch([i])["image"], ref.get_batch([i])["image"]
        # bfloat16's 8-bit mantissa, not float16 storage rounding (the same in both runs)
        assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05 * float(b.abs().max()))
    with pytest.raises(ValueError, match="was prepared from other inputs or settings"):
        prepare(_cfg(inputs, tmp_path / "bf16", **kw), log=lambda m: None)


def test_vae_and_text_batches_are_batches(tmp_path, monkeypatch):
    import megatron_apex.data.encoders as encoders

    calls = {"vae": [], "text": []}
    real_images, real_states = encoders.encode_images, encoders.MiniLMStates.encode

    def images(vae, geom, pixels):
        calls["vae"].append(tuple(pixels.shape))
        return real_images(vae, geom, pixels)

    def states(self, captions, max_length, negative=False):
        calls["text"].append(len(captions))
        return real_states(self, captions, max_length, negative)

    monkeypatch.setattr(encoders, "encode_images", images)
    monkeypatch.setattr(encoders.MiniLMStates, "encode", states)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):  # five 28x28 and two 20x40 images, all captioned
        size = (20, 40) if i in (2, 5) else (28, 28)
        Image.fromarray(np.full(size, i, dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    prepare(_cfg(folder, tmp_path / "out", samples_per_shard=7, vae_batch_size=2, text_batch_size=3),
            log=lambda m: None)
    # per shape, in input order, at most --vae-batch-size at a time
    assert calls["vae"] == [(2, 1, 20, 40), (2, 1, 28, 28), (2, 1, 28, 28), (1, 1, 28, 28)]
    assert calls["text"] == [3, 3, 1, 1]  # the shard's 7 captions, then the empty prompt


def test_progress_bar_counts_images_and_is_off_with_no_progress(tmp_path, capsys):
    inputs = _images(tmp_path / "in", n=6)
    prepare(_cfg(inputs, tmp_path / "out", progress=True), log=lambda m: None)
    err = capsys.readouterr().err
    assert "prepare_data" in err and "6/6" in err and "img" in err
    prepare(_cfg(inputs, tmp_path / "quiet", progress=False), log=lambda m: None)
    assert capsys.readouterr().err == ""
