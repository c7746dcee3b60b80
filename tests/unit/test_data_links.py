"""Inputs never lead outside their folder: symbolic and hard links among prepare_data's inputs
(folder files, jsonl paths, tar members) and among the tar members of training shards (both
readers) are skipped, counted and named, never followed; links that stay inside are fine."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from megatron_apex.data.prepare import PrepareConfig, prepare

SIZE = (28, 28)  # an exact bucket of --resolution 28 with multiple 4: the latent is the pixels


def _png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _cfg(inputs, output):
    return PrepareConfig(inputs=[str(i) for i in inputs], output=str(output), vae="none", channels=1,
                         resolution=28, patch_size=4, max_text_len=8, samples_per_shard=100, progress=False)


def _stored(out):
    """{source name: (latent as uint8 pixels, caption)} of every prepared sample."""
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    got = {}
    for name, data in members.items():
        if name.endswith(".json"):
            key = name[:-len(".json")]
            latent = np.load(io.BytesIO(members[f"{key}.latent.npy"]))[0].astype(np.float32)
            pixels = np.rint((latent + 1.0) * 127.5).astype(np.uint8)
            got[json.loads(data)["source"]] = (pixels, members[f"{key}.txt"].decode())
    return got


def _reasons(summary):
    return {s["input"]: s["reason"] for s in summary["skipped"]}


def test_folder_links_leading_outside_are_skipped_counted_and_named(tmp_path):
    folder, outside = tmp_path / "in", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    pixels = {i: _png(folder / f"img{i}.png", i) for i in range(3)}
    for i in range(3):
        (folder / f"img{i}.txt").write_text(f"picture {i}")
    secret = _png(outside / "secret.png", 10)
    (outside / "secret.txt").write_text("a private note")
    _png(outside / "other.png", 11)

    os.symlink(outside / "secret.png", folder / "link_out.png")       # a symlink out
    (folder / "link_out.txt").write_text("caption of the link")
    os.link(outside / "other.png", folder / "hard.png")               # a second name of a file outside
    (folder / "hard.txt").write_text("caption of the hard link")
    (folder / "img1.txt").unlink()
    os.symlink(outside / "secret.txt", folder / "img1.txt")           # a caption read from outside
    with tarfile.open(outside / "pack.tar", "w") as tar:
        tar.add(outside / "secret.png", arcname="packed.png")
        tar.add(outside / "secret.txt", arcname="packed.txt")
    os.symlink(outside / "pack.tar", folder / "pack.tar")             # a tar read from outside
    os.symlink("img0.png", folder / "alias.png")                      # stays inside: accepted
    (folder / "alias.txt").write_text("the same picture again")

    logs = []
    summary = prepare(_cfg([folder], tmp_path / "out"), log=logs.append)

    reasons = _reasons(summary)
    assert sorted(reasons) == sorted(str(folder / n) for n in ("link_out.png", "hard.png", "img1.png", "pack.tar"))
    assert reasons[str(folder / "link_out.png")].startswith(
        f"leads outside its input folder (a symbolic link to {outside / 'secret.png'}")
    assert reasons[str(folder / "pack.tar")].startswith(
        f"leads outside its input folder (a symbolic link to {outside / 'pack.tar'}")
    assert reasons[str(folder / "hard.png")].startswith("leads outside its input folder (a hard link (2 names")
    assert reasons[str(folder / "img1.png")].startswith(
        f"caption leads outside its input folder (a symbolic link to {outside / 'secret.txt'}")
    assert any("skipped 4 inputs: 1 caption leads outside its input folder, 3 leads outside its input folder"
               in line for line in logs)
    for name in ("link_out.png", "hard.png", "img1.png", "pack.tar"):
        assert any(line.strip().startswith(f"[prepare_data]   {folder / name}: ") for line in logs), name

    stored = _stored(tmp_path / "out")
    assert sorted(stored) == sorted(str(folder / n) for n in ("alias.png", "img0.png", "img2.png"))
    assert summary["samples"] == 3
    for name, i in (("img0.png", 0), ("alias.png", 0), ("img2.png", 2)):
        np.testing.assert_array_equal(stored[str(folder / name)][0], pixels[i])
    assert stored[str(folder / "alias.png")][1] == "the same picture again"
    assert not any(np.array_equal(p, secret) for p, _ in stored.values())
    assert "a private note" not in {c for _, c in stored.values()}


def test_jsonl_paths_are_never_links_out(tmp_path):
    """A jsonl may list files anywhere (absolute paths, `..`): it is the user's own list. The
    files it names are read only if they are not links leading out of their folder or hard
    links."""
    lists, outside = tmp_path / "lists", tmp_path / "outside"
    (lists / "imgs").mkdir(parents=True)
    outside.mkdir()
    good = _png(lists / "imgs" / "good.png", 0)
    secret = _png(outside / "secret.png", 1)
    _png(outside / "other.png", 2)
    os.symlink(outside / "secret.png", lists / "imgs" / "link.png")
    os.link(outside / "other.png", lists / "imgs" / "hard.png")
    os.symlink(lists / "imgs" / "good.png", lists / "alias.png")  # inside: accepted
    rows = [("imgs/good.png", "good"), ("imgs/link.png", "link"), ("imgs/hard.png", "hard"),
            ("../outside/secret.png", "dot-dot"), (str(outside / "secret.png"), "absolute"),
            (str(lists / "alias.png"), "absolute inside")]
    (lists / "list.jsonl").write_text("\n".join(json.dumps({"path": p, "caption": c}) for p, c in rows))

    logs = []
    summary = prepare(_cfg([lists / "list.jsonl"], tmp_path / "out"), log=logs.append)

    reasons = _reasons(summary)
    assert sorted(reasons) == sorted([str(lists / "imgs/link.png"), str(lists / "imgs/hard.png")])
    assert reasons[str(lists / "imgs/link.png")].startswith("leads outside its input folder (a symbolic link to "
                                                            f"{outside / 'secret.png'}")
    assert reasons[str(lists / "imgs/hard.png")].startswith("leads outside its input folder (a hard link")
    assert any("skipped 2 inputs: 2 leads outside its input folder" in line for line in logs)
    stored = _stored(tmp_path / "out")
    assert sorted(c for _, c in stored.values()) == ["absolute", "absolute inside", "dot-dot", "good"]
    for p, c in stored.values():
        np.testing.assert_array_equal(p, secret if c in ("absolute", "dot-dot") else good)


def _add(tar, name, data=None, link=None, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    if link is not None:
        info.linkname = link
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def test_tar_link_members_are_skipped_and_counted(tmp_path):
    pixels = _png(tmp_path / "a.png", 0)
    archive = tmp_path / "pack.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "a.png", (tmp_path / "a.png").read_bytes())
        _add(tar, "a.txt", b"the one real picture")
        _add(tar, "evil.png", link="/etc/hostname", kind=tarfile.SYMTYPE)
        _add(tar, "evil.txt", b"caption of the symlink")
        _add(tar, "copy.png", link="a.png", kind=tarfile.LNKTYPE)
        _add(tar, "copy.txt", b"caption of the hard link")

    logs = []
    summary = prepare(_cfg([archive], tmp_path / "out"), log=logs.append)

    assert _reasons(summary) == {f"{archive}:evil.png": "link member not followed (a symbolic link to /etc/hostname)",
                                 f"{archive}:copy.png": "link member not followed (a hard link to a.png)"}
    assert any("skipped 2 inputs: 2 link member not followed" in line for line in logs)
    assert any(f"{archive}:evil.png: link member" in line for line in logs)
    assert any(f"{archive}:copy.png: link member" in line for line in logs)
    stored = _stored(tmp_path / "out")
    assert list(stored) == [f"{archive}:a.png"]
    np.testing.assert_array_equal(stored[f"{archive}:a.png"][0], pixels)


# ---- training shards: the latent loader (latent_shards.v1) and the webdataset reader (shards.v1)

def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_latent_loader_leaves_out_samples_with_link_members(tmp_path):
    from megatron_apex.data.latent_loader import LatentShardDataset
    from megatron_apex.data.latent_format import LATENT_FORMAT

    rng = np.random.default_rng(0)
    latents = {}
    folder = tmp_path / "data"
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for k in range(6):
            key = f"{k:08d}"
            latents[key] = rng.standard_normal((2, 4, 4)).astype(np.float16)
            members = {"latent.npy": _npy(latents[key]), "ctx.npy": _npy(np.ones((2, 3), np.float16)),
                       "mask.npy": _npy(np.ones(2, bool)), "json": json.dumps({"latent_size": [4, 4]}).encode()}
            if k == 2:
                del members["latent.npy"]  # its latent is a symlink out of the archive instead
                _add(tar, f"{key}.latent.npy", link="/etc/hostname", kind=tarfile.SYMTYPE)
            for suffix, data in members.items():
                _add(tar, f"{key}.{suffix}", data)
            if k == 4:  # complete, plus a hard link standing for its caption
                _add(tar, f"{key}.txt", link="00000000.json", kind=tarfile.LNKTYPE)
    manifest = dict(format=LATENT_FORMAT, latent_channels=2, context_dim=3, max_text_len=4, buckets=[[4, 4]],
                    shards=[dict(name="shard-000000.tar", count=6)])
    (folder / "manifest.json").write_text(json.dumps(manifest))

    logged = []
    ds = LatentShardDataset(folder, log=logged.append)

    assert ds.skipped == 2 and len(logged) == 2
    assert ds.keys == ["00000000", "00000001", "00000003", "00000005"]
    shard = folder / "shard-000000.tar"
    assert logged[0] == (f"[megatron_apex] data: skipped {shard}:00000002: member 00000002.latent.npy is a "
                         "symbolic link to /etc/hostname (links are never followed)")
    assert logged[1] == (f"[megatron_apex] data: skipped {shard}:00000004: member 00000004.txt is a "
                         "hard link to 00000000.json (links are never followed)")
    batch = ds.get_batch(range(4))
    for row, key in enumerate(ds.keys):
        np.testing.assert_array_equal(batch["image"][row].numpy(), latents[key].astype(np.float32))


def test_shard_reader_leaves_out_samples_with_link_members(tmp_path):
    import hashlib

    from megatron_apex.data.shard_reader import read_shard
    from megatron_apex.data.shard_writer import SHARD_FORMAT, encode_sample, write_manifest
    from megatron_apex.data.shards import load_dataset

    rng = np.random.default_rng(0)
    images = {}
    root = tmp_path / "ds"
    root.mkdir()
    shard = root / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for k in range(5):
            key = f"{k:07d}"
            images[key] = rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)
            sample = encode_sample(dict(key=key, image=images[key], context=np.ones((2, 4), np.float16),
                                        caption=f"caption {k}", label=k))
            if k == 1:  # its caption is a symlink out of the archive instead
                del sample["txt"]
            for suffix, data in sample.items():
                if suffix != "__key__":
                    _add(tar, f"{key}.{suffix}", data)
            if k == 1:
                _add(tar, f"{key}.txt", link="/etc/hostname", kind=tarfile.SYMTYPE)
            if k == 3:  # complete, plus a hard link to another sample's image
                _add(tar, f"{key}.png", link="0000000.image.npy", kind=tarfile.LNKTYPE)
    entry = dict(name=shard.name, count=5, sha256=hashlib.sha256(shard.read_bytes()).hexdigest(),
                 bytes=shard.stat().st_size)
    write_manifest(root, dict(format=SHARD_FORMAT, splits={"train": dict(count=5, shards=[entry])},
                              max_text_len=4, context_dim=4))

    logged = []
    ds = load_dataset(root, cache_dir=tmp_path / "cache", log=logged.append)

    assert ds.keys == ["0000000", "0000002", "0000004"]
    assert ds.link_members == [f"{shard}:0000001.txt (symbolic link to /etc/hostname)",
                               f"{shard}:0000003.png (hard link to 0000000.image.npy)"]
    assert logged == [f"[megatron_apex] data: {shard}: 2 link members not followed, 2 samples left out: "
                      "0000001.txt (symbolic link to /etc/hostname), 0000003.png (hard link to 0000000.image.npy)"]
    batch = ds.get_batch(range(3))
    for row, key in enumerate(ds.keys):
        np.testing.assert_allclose(batch["image"][row].numpy(), images[key] / 127.5 - 1, rtol=0, atol=1e-6)
        assert batch["caption"][row] == f"caption {int(key)}"
    assert not (tmp_path / "cache" / "memo").exists()  # never memoised: every load names the links again
    again = []
    assert [s["key"] for s in read_shard(shard, log=again.append)] == ds.keys
    assert again == logged
