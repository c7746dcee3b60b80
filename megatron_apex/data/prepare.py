"""Images + captions -> `megatron_apex.latent_shards.v1` shards of pre-encoded latents and text states.

Inputs (any mix, each `--input`): a folder (PNG/JPEG files, captions in a sidecar `<stem>.txt`;
tar files inside it are read too), a tar file of such pairs, or a jsonl of
{"path", "caption"} lines (paths relative to the jsonl's folder).

Inputs never lead outside their folder (the folder given, or the jsonl's folder): an image,
caption or tar file there that is a symbolic link to a place outside it, or a hard link (its
other names may lie anywhere), is skipped and listed with the reason, as is a jsonl path outside
the jsonl's folder; link members of a tar are never followed, and are skipped and listed too.

Output folder: `manifest.json` + `shard-NNNNNN.tar` (+ `.tar.gz` with compress) + one
`shard-NNNNNN.json` per shard (its manifest entry, with the inputs it skipped). Per sample
(webdataset key = the input's index in the sorted input list, 8 digits): `latent.npy` float16
(C, h, w), `ctx.npy` float16 (n, D) the n real text tokens, `mask.npy` bool (n,), `txt` the
caption, `json` {"original_size": [H, W], "bucket": [h, w] pixels, "latent_size": [h', w'],
"source": input name}. `empty_prompt.npy` float16 (n, D): the text encoder's states of the empty
prompt, for caption dropout and classifier-free guidance.

Determinism: the input list is sorted; input i goes to shard i // samples_per_shard whether or
not it decodes (a skipped input leaves its shard one sample shorter, so later shards never
move); tar members carry mtime 0, uid/gid 0, no user names; gzip mtime 0. A rerun keeps every
shard whose tar and entry exist (written to temporary names, then renamed) and rebuilds the
rest byte for byte, as long as the inputs and settings are the same (a signature in every
entry; a mismatch is an error, not a silent mix). Encoders run on CPU in float32 with a fixed
batch composition per shard; bytes are identical between runs with the same thread count.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_apex.data.buckets import bucket_table, nearest_bucket, resize_to_bucket
from megatron_apex.data.empty_prompt import EMPTY_PROMPT, EMPTY_PROMPT_FILE

LATENT_FORMAT = "megatron_apex.latent_shards.v1"
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
CAPTION_EXTS = (".txt", ".json")  # sidecar captions: plain text, or {"caption": ...} (.txt wins)
# member suffixes of one sample, in the order they are written
MEMBERS = ("latent.npy", "ctx.npy", "mask.npy", "txt", "json")


@dataclass
class PrepareConfig:
    inputs: list
    output: str
    vae: str = "none"             # a local diffusers autoencoder folder (encoders.VAE_CLASSES), or "none" (pixels)
    text_encoder: str = "minilm"  # or a local transformers folder (Qwen2.5-VL, Gemma-2, ...)
    resolution: int = 256         # bucket area ~ resolution**2 pixels
    patch_size: int = 2           # latent sides are multiples of this
    channels: int = 3             # pixel channels with --vae none (1: grey, 3: RGB)
    max_text_len: int = 64
    samples_per_shard: int = 1000
    workers: int = 1
    compress: bool = False        # gzip the tars (smaller, but the loader then holds them in memory)
    vae_batch_size: int = 16
    text_batch_size: int = 64
    progress: bool = True


@dataclass(frozen=True)
class InputItem:
    name: str                             # what summaries and sample json call it
    path: str                             # image file, or the tar holding it
    member: str = ""                      # tar member name ("" = a plain file)
    caption: Optional[str] = None         # from a jsonl
    caption_path: Optional[str] = None    # sidecar .txt/.json file, or the tar holding it
    caption_member: str = ""


# ------------------------------------------------------------------------------ the input list

def _tar_items(tar_path: Path) -> tuple[list[InputItem], list[dict]]:
    """The images of a tar file; a truncated tar keeps the members before the damage."""
    from megatron_apex.untrusted import safe_member_name

    members, skipped = [], []
    try:
        with tarfile.open(tar_path) as tar:
            while (member := tar.next()) is not None:
                members.append(member)
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not members:
            raise ValueError(f"--input {tar_path}: not a readable tar file ({exc})") from None
        skipped.append(dict(input=str(tar_path), reason=f"damaged tar after {len(members)} members "
                                                        f"({type(exc).__name__}); the members before it are used"))
    files = {}
    for m in members:
        safe_member_name(m.name, str(tar_path))  # a hostile name refuses the whole archive
        if m.isfile():
            files[m.name] = m
        elif m.issym() or m.islnk():  # reading it would read another member, or a file outside
            skipped.append(dict(input=f"{tar_path}:{m.name}", reason=_link_member_reason(m)))
    items = []
    for name in sorted(files):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            side = next((stem + s for s in CAPTION_EXTS if stem + s in files), "")
            items.append(InputItem(name=f"{tar_path}:{name}", path=str(tar_path), member=name,
                                   caption_path=str(tar_path) if side else None, caption_member=side))
    return items, skipped


def _link_member_reason(member: tarfile.TarInfo) -> str:
    kind = "symbolic" if member.issym() else "hard"
    return f"link member not followed (a {kind} link to {member.linkname})"


def _outside_reason(path: Path, root: Path, what: str = "") -> Optional[str]:
    """The skip reason when the file `path` of the input folder `root` leads outside it, else None."""
    from megatron_apex.untrusted import link_escape

    why = link_escape(str(path), str(root))
    return f"{what}leads outside its input folder ({why})" if why else None


def _folder_items(folder: Path) -> tuple[list[InputItem], list[dict]]:
    items, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower()
        is_tar = path.name.endswith((".tar", ".tar.gz", ".tgz"))
        if ext not in IMAGE_EXTS and not is_tar:
            continue
        reason = _outside_reason(path, folder)
        if reason:
            skipped.append(dict(input=str(path), reason=reason))
        elif is_tar:
            got, bad = _tar_items(path)
            items.extend(got)
            skipped.extend(bad)
        else:
            side = next((path.with_suffix(s) for s in CAPTION_EXTS if path.with_suffix(s).is_file()), None)
            reason = _outside_reason(side, folder, "caption ") if side else None
            if reason:
                skipped.append(dict(input=str(path), reason=reason))
            else:
                items.append(InputItem(name=str(path), path=str(path), caption_path=str(side) if side else None))
    return items, skipped


def _jsonl_path_reason(path: Path) -> Optional[str]:
    """Why a jsonl's image path may not be read. The jsonl is the user's own list, like paths
    on a command line, so it may name files anywhere (absolute, or with `..`: image stores
    usually live apart from their lists); but the file it names must be that file, not a link
    leading out of its own folder or a hard link. A missing file is left to the read, which
    skips it as not found."""
    return _outside_reason(path, path.parent) if os.path.lexists(path) else None


def _jsonl_items(jsonl: Path) -> tuple[list[InputItem], list[dict]]:
    items, skipped = [], []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(dict(input=where, reason=f"not JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            skipped.append(dict(input=where, reason="no 'path' string"))
            continue
        path = Path(row["path"]) if os.path.isabs(row["path"]) else jsonl.parent / row["path"]
        reason = _jsonl_path_reason(path)
        if reason:
            skipped.append(dict(input=str(path), reason=reason))
            continue
        caption = row.get("caption")
        items.append(InputItem(name=str(path), path=str(path),
                               caption=caption if isinstance(caption, str) else None))
    return items, skipped


def list_inputs(inputs) -> tuple[list[InputItem], list[dict]]:
    """Every input image, sorted by name; plus what could not be listed (bad jsonl lines, damaged tars,
    files and tar members that would lead outside their input folder)."""
    if not inputs:
        raise ValueError("--input: give at least one image folder, tar file or jsonl file")
    items, skipped = [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            got, bad = _folder_items(path)
        elif path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz")):
            got, bad = _tar_items(path)
        elif path.is_file() and path.suffix == ".jsonl":
            got, bad = _jsonl_items(path)
        elif path.exists():
            raise ValueError(f"--input {raw}: expected a folder, a .tar/.tar.gz file or a .jsonl file")
        else:
            raise FileNotFoundError(f"--input {raw} does not exist")
        items.extend(got)
        skipped.extend(bad)
    items.sort(key=lambda it: it.name)
    return items, skipped


# ------------------------------------------------------------------------------ encoders

_ENCODERS: dict = {}


def _encoders(cfg: PrepareConfig):
    """(vae or None, text encoder), loaded once per process."""
    from megatron_apex.data.encoders import load_text_encoder, load_vae

    key = (cfg.vae, cfg.text_encoder)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = (load_vae(cfg.vae), load_text_encoder(cfg.text_encoder))
    return _ENCODERS[key]


def _encode_latents(pixels: list[np.ndarray], cfg: PrepareConfig, geom: dict) -> list[np.ndarray]:
    """uint8 (h, w[, c]) arrays -> float16 (C, h/f, w/f): pixels in [-1, 1] or VAE latents.

    Same-shape images are encoded together in batches of --vae-batch-size, in input order, so a
    shard's batches (hence its bytes) depend only on its own inputs."""
    import torch

    from megatron_apex.data.encoders import encode_images

    chw = [(p[None] if p.ndim == 2 else np.moveaxis(p, -1, 0)).astype(np.float32) / 127.5 - 1.0 for p in pixels]
    vae, _ = _encoders(cfg)
    out: list = [None] * len(chw)
    by_shape: dict = {}
    for i, x in enumerate(chw):
        by_shape.setdefault(x.shape, []).append(i)
    for shape in sorted(by_shape):
        idx = by_shape[shape]
        for start in range(0, len(idx), cfg.vae_batch_size):
            part = idx[start:start + cfg.vae_batch_size]
            z = encode_images(vae, geom, torch.from_numpy(np.stack([chw[i] for i in part]))).numpy()
            for j, i in enumerate(part):
                out[i] = z[j].astype(np.float16)
    return out


def _encode_texts(captions: list[str], cfg: PrepareConfig) -> list[np.ndarray]:
    _, text_encoder = _encoders(cfg)
    out = []
    for start in range(0, len(captions), cfg.text_batch_size):
        out.extend(text_encoder.encode(captions[start:start + cfg.text_batch_size], cfg.max_text_len))
    return out


# ------------------------------------------------------------------------------ one shard

def _open_tar(path: str):
    """(open tar, {name: member}) of the members before any damage (tarfile's own name lookup
    reads the whole index and fails on a truncated file)."""
    tar = tarfile.open(path)
    infos = {}
    try:
        while (member := tar.next()) is not None:
            infos[member.name] = member
    except (tarfile.TarError, OSError, EOFError):
        pass  # listed as damaged when the inputs were collected
    return tar, infos


def _read_bytes(path: str, member: str, tars: dict, what: str) -> bytes:
    """The bytes of a file or tar member; ValueError (the skip reason) if they cannot be read."""
    try:
        if not member:
            with open(path, "rb") as f:
                return f.read()
        if path not in tars:
            tars[path] = _open_tar(path)
        tar, infos = tars[path]
        if member not in infos:
            raise ValueError(f"{what} member not found")
        f = tar.extractfile(infos[member])
        if f is None:
            raise ValueError(f"{what} is not a regular file")
        return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} file not found") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        # a truncated member: tarfile raises ReadError("unexpected end of data")
        raise ValueError(f"unreadable {what} ({type(exc).__name__})") from None


def _load_item(item: InputItem, mode: str, tars: dict):
    """(PIL image, caption) of one input, or a ValueError whose text is the skip reason."""
    from PIL import Image, ImageOps

    if item.caption is not None:
        caption = item.caption
    elif item.caption_path is not None:
        try:
            caption = _read_bytes(item.caption_path, item.caption_member, tars, "caption").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("caption is not UTF-8 text") from None
        if (item.caption_member or item.caption_path).endswith(".json"):
            try:
                caption = json.loads(caption)["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                caption = None
            if not isinstance(caption, str):
                raise ValueError("caption json has no 'caption' string") from None
    else:
        raise ValueError("missing caption")
    data = _read_bytes(item.path, item.member, tars, "image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image).convert(mode)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        # the exception's type, not its text: PIL's texts name object addresses, and the reason is
        # stored in the shard's entry, which must come out byte-identical on a rerun
        raise ValueError(f"undecodable image ({type(exc).__name__})") from None
    return image, caption


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def shard_names(index: int, compress: bool) -> tuple[str, str]:
    return f"shard-{index:06d}.tar" + (".gz" if compress else ""), f"shard-{index:06d}.json"


def build_shard(cfg: PrepareConfig, index: int, first: int, items: list[InputItem], buckets: list,
                geom: dict, signature: str) -> dict:
    """Encode and write shard `index` (inputs first, first+1, ...); return its entry."""
    tar_name, entry_name = shard_names(index, cfg.compress)
    out = Path(cfg.output)
    mode = "L" if geom["image_channels"] == 1 else "RGB"
    keys, pixels, captions, infos, skipped, tars = [], [], [], [], [], {}
    try:
        for offset, item in enumerate(items):
            try:
                image, caption = _load_item(item, mode, tars)
            except ValueError as exc:
                skipped.append(dict(input=item.name, reason=str(exc)))
                continue
            bucket = nearest_bucket(image.height, image.width, buckets)
            keys.append(f"{first + offset:08d}")
            pixels.append(resize_to_bucket(image, bucket))
            captions.append(caption)
            f = geom["factor"]
            infos.append(dict(original_size=[image.height, image.width], bucket=list(bucket),
                              latent_size=[bucket[0] // f, bucket[1] // f], source=item.name))
    finally:
        for tar, _ in tars.values():
            tar.close()
    latents = _encode_latents(pixels, cfg, geom) if pixels else []
    states = _encode_texts(captions, cfg) if captions else []

    raw = io.BytesIO()
    stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if cfg.compress else raw
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        bucket_counts: dict = {}
        for key, latent, state, caption, info in zip(keys, latents, states, captions, infos):
            mask = np.ones(len(state), dtype=bool)  # the real tokens only: the loader pads
            payload = dict(zip(MEMBERS, (_npy(latent), _npy(state.astype(np.float16)), _npy(mask),
                                         caption.encode("utf-8"), json.dumps(info, sort_keys=True).encode())))
            for suffix in MEMBERS:
                _add_member(tar, f"{key}.{suffix}", payload[suffix])
            grid = "x".join(map(str, info["latent_size"]))
            bucket_counts[grid] = bucket_counts.get(grid, 0) + 1
    if cfg.compress:
        stream.close()
    data = raw.getvalue()
    entry = dict(name=tar_name, index=index, count=len(keys), bytes=len(data),
                 sha256=hashlib.sha256(data).hexdigest(), buckets=dict(sorted(bucket_counts.items())),
                 skipped=skipped, signature=signature)
    tmp = out / f"{tar_name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    # the entry first, the tar last: a shard counts as done only once its tar has its final name
    _atomic_write(out / entry_name, json.dumps(entry, indent=1, sort_keys=True).encode())
    os.replace(tmp, out / tar_name)
    return entry


def _existing_entry(out: Path, index: int, compress: bool, signature: str) -> Optional[dict]:
    tar_name, entry_name = shard_names(index, compress)
    if not ((out / tar_name).is_file() and (out / entry_name).is_file()):
        return None
    try:
        entry = json.loads((out / entry_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged entry: rebuild the shard
    if entry.get("signature") != signature:
        raise ValueError(f"--output {out}: {tar_name} was prepared from other inputs or settings; "
                         "use a new --output folder (or delete its shards)")
    if entry.get("bytes") != (out / tar_name).stat().st_size:
        return None
    return entry


# ------------------------------------------------------------------------------ the whole run

def _worker_init(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


def _build_job(job):
    return build_shard(*job)


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Write the shards that are missing and the manifest; return a summary dict."""
    from megatron_apex.data.encoders import read_vae_config, text_encoder_info, vae_geometry

    for name in ("samples_per_shard", "workers", "max_text_len", "patch_size", "vae_batch_size", "text_batch_size"):
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    geom = vae_geometry(cfg.vae, cfg.channels)
    text = text_encoder_info(cfg.text_encoder)
    buckets = bucket_table(cfg.resolution, geom["factor"] * cfg.patch_size)
    items, list_skipped = list_inputs(cfg.inputs)
    if not items:
        raise ValueError(f"--input {' '.join(map(str, cfg.inputs))}: no PNG/JPEG images found")
    settings = dict(vae=cfg.vae if cfg.vae == "none" else os.path.abspath(cfg.vae),
                    vae_config=read_vae_config(cfg.vae), text_encoder=text,
                    text_encoder_path=cfg.text_encoder if cfg.text_encoder == "minilm" else os.path.abspath(
                        cfg.text_encoder), resolution=cfg.resolution, patch_size=cfg.patch_size,
                    channels=geom["image_channels"], max_text_len=cfg.max_text_len,
                    samples_per_shard=cfg.samples_per_shard, compress=cfg.compress, buckets=buckets,
                    inputs=[dataclasses.astuple(it) for it in items])
    signature = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp-*"):  # half-written files of an interrupted run (one run per folder at a time)
        if stale.name.startswith(("shard-", MANIFEST_NAME, EMPTY_PROMPT_FILE)):
            stale.unlink()

    sps = cfg.samples_per_shard
    num_shards = -(-len(items) // sps)
    entries, jobs = {}, []
    for s in range(num_shards):
        entry = _existing_entry(out, s, cfg.compress, signature)
        if entry is not None:
            entries[s] = entry
        else:
            jobs.append((cfg, s, s * sps, items[s * sps:(s + 1) * sps], buckets, geom, signature))
    kept = len(entries)
    bar = None
    if cfg.progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="shards", dynamic_ncols=True)
    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs)), _worker_init, (threads,)) as pool:
            for entry in pool.imap_unordered(_build_job, jobs):
                entries[entry["index"]] = entry
                if bar is not None:
                    bar.update(1)
    else:
        for job in jobs:
            entry = _build_job(job)
            entries[entry["index"]] = entry
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    shards = [entries[s] for s in range(num_shards)]
    skipped = list_skipped + [sk for e in shards for sk in e["skipped"]]
    total = sum(e["count"] for e in shards)
    if total == 0:
        raise ValueError(f"--input {' '.join(map(str, cfg.inputs))}: none of the {len(items)} inputs could be "
                         f"used ({_reason_counts(skipped)})")
    latent_buckets = sorted({tuple(map(int, g.split("x"))) for e in shards for g in e["buckets"]})
    manifest = dict(
        format=LATENT_FORMAT, count=total,
        vae=dict(geom, downsample=geom["factor"]),
        text_encoder={k: v for k, v in text.items() if k != "fingerprint"},
        latent_channels=geom["latent_channels"], context_dim=text["dim"], max_text_len=cfg.max_text_len,
        resolution=cfg.resolution, patch_size=cfg.patch_size,
        pixel_buckets=[list(b) for b in buckets],
        buckets=[[h // geom["factor"], w // geom["factor"]] for h, w in buckets],
        used_buckets=[list(b) for b in latent_buckets],
        shards=[{k: e[k] for k in ("name", "count", "bytes", "sha256", "buckets")} for e in shards],
        skipped=len(skipped), signature=signature)
    if jobs or not (out / EMPTY_PROMPT_FILE).is_file():  # for caption dropout and classifier-free guidance
        _atomic_write(out / EMPTY_PROMPT_FILE, _npy(_encode_texts([EMPTY_PROMPT], cfg)[0].astype(np.float16)))
    _atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    summary = dict(samples=total, shards=num_shards, shards_kept=kept, shards_written=len(jobs),
                   skipped=skipped, manifest=str(out / MANIFEST_NAME))
    log(f"[prepare_data] {total} samples in {num_shards} shards ({len(jobs)} written, {kept} kept) -> {out}")
    if skipped:
        log(f"[prepare_data] skipped {len(skipped)} inputs: {_reason_counts(skipped)}")
        for sk in skipped[:20]:
            log(f"[prepare_data]   {sk['input']}: {sk['reason']}")
        if len(skipped) > 20:
            log(f"[prepare_data]   ... and {len(skipped) - 20} more (listed in the shard-*.json entries)")
    return summary


def _reason_counts(skipped: list[dict]) -> str:
    counts: dict = {}
    for sk in skipped:
        reason = sk["reason"].split(" (")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none skipped"
