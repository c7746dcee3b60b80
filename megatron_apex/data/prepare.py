"""Images + captions -> `megatron_apex.latent_shards.v1` shards of pre-encoded latents and text states.

Inputs (any mix, each `--input`): a folder (PNG/JPEG files, captions in a sidecar `<stem>.txt`;
tar files inside it are read too), a tar file of such pairs, or a jsonl of
{"path", "caption"} lines (paths relative to the jsonl's folder).

Inputs never lead outside their folder (the folder given, or the jsonl's folder): an image,
caption or tar file there that is a symbolic link to a place outside it, or a hard link (its
other names may lie anywhere), is skipped and listed with the reason, as is a jsonl path outside
the jsonl's folder; link members of a tar are never followed, and are skipped and listed too.

Output folder: `manifest.json` + `shard-NNNNNN.tar` (+ `.tar.gz` with compress) + one
`shard-NNNNNN.json` per shard (its manifest entry, with the inputs it skipped) + one
`shard-NNNNNN.idx.npy` per shard (where each sample's members lie, its latent grid and text
length: the loader's start-up reads these instead of the tar headers). Per sample (webdataset
key = the input's index in the sorted input list, 8 digits): `latent.npy` float16 (C, h, w),
`ctx.npy` float16 (n, D) the n real text tokens, `mask.npy` bool (n,), `txt` the caption, `json`
{"original_size": [H, W], "bucket": [h, w] pixels, "latent_size": [h', w'], "source": input name}.
`empty_prompt.npy` float16 (n, D): the text encoder's states of the empty prompt, for caption
dropout and classifier-free guidance.

Encoders run on `--device` (a GPU when there is one) in `--dtype` (bfloat16 on a GPU, float32 on
the CPU); images are decoded and resized by PIL, or by NVIDIA DALI on the GPU when it is installed
(megatron_apex/data/dali_decode.py). Under torchrun each process builds the shards s with
s % WORLD_SIZE == RANK on its own GPU, and rank 0 writes the manifest once all are done.

Determinism: the input list is sorted; input i goes to shard i // samples_per_shard whether or
not it decodes (a skipped input leaves its shard one sample shorter, so later shards never
move); tar members carry mtime 0, uid/gid 0, no user names; gzip mtime 0. A rerun keeps every
shard whose tar, index and entry exist (written to temporary names, then renamed) and rebuilds
the rest byte for byte, as long as the inputs and settings are the same (a signature in every
entry; a mismatch is an error, not a silent mix). Encoders run with a fixed batch composition
per shard, so a shard's bytes depend neither on which process builds it nor on how many there
are (with the same device kind, dtype, decoder and thread count).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_apex.data.buckets import bucket_table, cover_and_crop, nearest_bucket, resize_to_bucket
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
    max_text_len: Optional[int] = None  # None: the text encoder family's (encoders.FAMILY_MAX_TEXT_LEN)
    samples_per_shard: int = 1000
    workers: int = 1
    compress: bool = False        # gzip the tars (smaller, but the loader then holds them in memory)
    vae_batch_size: int = 16
    text_batch_size: int = 64
    progress: bool = True
    device: str = "auto"          # cpu | cuda | cuda:N; auto: cuda when available (torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"           # float32 | bfloat16; auto: bfloat16 on a GPU, float32 on the CPU
    decoder: str = "auto"         # pil | dali; auto: DALI on a GPU when installed, else PIL
    complex_human_instruction: bool = True  # Sana (Gemma-2): SanaPipeline's default instruction


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


# ------------------------------------------------------------------------------ devices and encoders

def resolve_device(device: Optional[str], local_rank: int = 0, world: int = 1) -> str:
    """--device -> 'cpu' or 'cuda:N'. 'cuda' (and 'auto' on a GPU machine) is this process's
    GPU: cuda:LOCAL_RANK under torchrun, the current device otherwise."""
    import torch

    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if match.group(1) is not None:
        index = int(match.group(1))
    elif world > 1:
        index = local_rank
    else:
        index = torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"--device {device}: this process would use cuda:{index}, but the machine has {count} GPUs"
                         + (" (torchrun: at most one process per GPU)" if world > 1 else ""))
    return f"cuda:{index}"


def resolve_dtype(dtype: Optional[str], device: str) -> str:
    if dtype in (None, "", "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype}: expected float32 or bfloat16")
    return dtype


def resolve_decoder(decoder: Optional[str], device: str) -> str:
    from megatron_apex.data import dali_decode

    if decoder in (None, "", "auto"):
        return "dali" if device.startswith("cuda") and dali_decode.dali_available() else "pil"
    if decoder not in ("pil", "dali"):
        raise ValueError(f"--decoder {decoder}: expected pil, dali or auto")
    if decoder == "dali" and not dali_decode.dali_available():
        raise ValueError("--decoder dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda120, the gpu "
                         "extra); use --decoder pil")
    return decoder


_ENCODERS: dict = {}


def _encoders(cfg: PrepareConfig):
    """(vae or None, text encoder), loaded once per process on cfg.device in cfg.dtype."""
    from megatron_apex.data.encoders import load_text_encoder, load_vae

    key = (cfg.vae, cfg.text_encoder, cfg.device, cfg.dtype, cfg.complex_human_instruction)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = (load_vae(cfg.vae, device=cfg.device, dtype=cfg.dtype),
                          load_text_encoder(cfg.text_encoder, device=cfg.device, dtype=cfg.dtype,
                                            complex_human_instruction=cfg.complex_human_instruction))
    return _ENCODERS[key]


def _encode_latents(pixels: list[np.ndarray], cfg: PrepareConfig, geom: dict, progress=None) -> list[np.ndarray]:
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
            z = encode_images(vae, geom, torch.from_numpy(np.stack([chw[i] for i in part]))).cpu().numpy()
            for j, i in enumerate(part):
                out[i] = z[j].astype(np.float16)
            if progress is not None:
                progress(len(part))
    return out


def _encode_texts(captions: list[str], cfg: PrepareConfig, negative: bool = False) -> list[np.ndarray]:
    _, text_encoder = _encoders(cfg)
    out = []
    for start in range(0, len(captions), cfg.text_batch_size):
        out.extend(text_encoder.encode(captions[start:start + cfg.text_batch_size], cfg.max_text_len,
                                       negative=negative))
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


def _read_item(item: InputItem, tars: dict) -> tuple[bytes, str]:
    """(encoded image bytes, caption) of one input, or a ValueError whose text is the skip reason."""
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
    return _read_bytes(item.path, item.member, tars, "image"), caption


def _undecodable(exc: Exception) -> ValueError:
    # the exception's type, not its text: PIL's texts name object addresses, and the reason is
    # stored in the shard's entry, which must come out byte-identical on a rerun
    return ValueError(f"undecodable image ({type(exc).__name__})")


def _pil_image(data: bytes, mode: str):
    """The decoded, EXIF-oriented PIL image in `mode`; ValueError (the skip reason) if undecodable."""
    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image).convert(mode)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise _undecodable(exc) from None


def _oriented_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the EXIF-oriented image from its header alone (no pixel decoding)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:
        raise _undecodable(exc) from None
    # orientations 5-8 turn the image a quarter: its sides swap, as ImageOps.exif_transpose swaps them
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


_DECODERS: dict = {}


def _dali_decoder(cfg: PrepareConfig, channels: int):
    """One DaliDecoder per process (on cfg.device's GPU; DALI's CPU operators with --device cpu)."""
    key = (cfg.device, channels)
    if key not in _DECODERS:
        from megatron_apex.data.dali_decode import DaliDecoder  # the one import of the optional DALI module

        _DECODERS.clear()
        device_id = int(cfg.device.split(":")[1]) if cfg.device.startswith("cuda") else None
        _DECODERS[key] = DaliDecoder(channels, device_id=device_id)
    return _DECODERS[key]


def _decode_pil(datas: list[bytes], mode: str, buckets: list) -> list:
    """Per image: (uint8 pixels of its bucket, (H, W) before resizing, bucket) or the ValueError."""
    out = []
    for data in datas:
        try:
            image = _pil_image(data, mode)
        except ValueError as exc:
            out.append(exc)
            continue
        bucket = nearest_bucket(image.height, image.width, buckets)
        out.append((resize_to_bucket(image, bucket), (image.height, image.width), bucket))
    return out


def _decode_dali(datas: list[bytes], mode: str, buckets: list, cfg: PrepareConfig) -> list:
    """_decode_pil's result through DALI: sizes from the headers, then decode, resize and crop in
    batches; a batch DALI cannot decode (a damaged or unusual file in it) goes through PIL, which
    also gives the skip reasons."""
    from megatron_apex.data.dali_decode import BATCH

    out: list = [None] * len(datas)
    todo = []
    for i, data in enumerate(datas):
        try:
            size = _oriented_size(data)
        except ValueError as exc:
            out[i] = exc
            continue
        bucket = nearest_bucket(size[0], size[1], buckets)
        todo.append((i, size, bucket, (*cover_and_crop(size[0], size[1], bucket), *bucket)))
    decoder = _dali_decoder(cfg, 1 if mode == "L" else 3)
    for start in range(0, len(todo), BATCH):
        part = todo[start:start + BATCH]
        try:
            pixels = decoder.decode([datas[i] for i, _, _, _ in part], [plan for _, _, _, plan in part])
        except Exception:  # DALI's errors are RuntimeErrors naming its operators; PIL names the file's fault
            pixels = None
        for k, (i, size, bucket, _) in enumerate(part):
            out[i] = (pixels[k], size, bucket) if pixels is not None else _decode_pil([datas[i]], mode, buckets)[0]
    return out


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; return the offset of its data in the (uncompressed) tar stream."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    # the data ends the stream written so far, padded to whole 512-byte blocks
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def _sample_members(latent: np.ndarray, state: np.ndarray, caption: str, info: dict) -> tuple[dict, dict]:
    """({suffix: bytes} of one sample, {suffix: payload bytes past the .npy header})."""
    ctx = state.astype(np.float16)
    mask = np.ones(len(ctx), dtype=bool)  # the real tokens only: the loader pads
    arrays = {"latent.npy": latent, "ctx.npy": ctx, "mask.npy": mask}
    payload = {suffix: _npy(a) for suffix, a in arrays.items()}
    payload["txt"] = caption.encode("utf-8")
    payload["json"] = json.dumps(info, sort_keys=True).encode()
    header = {suffix: len(payload[suffix]) - a.nbytes for suffix, a in arrays.items()}
    return payload, header


def build_shard(cfg: PrepareConfig, index: int, first: int, items: list[InputItem], buckets: list,
                geom: dict, signature: str, progress=None) -> dict:
    """Encode and write shard `index` (inputs first, first+1, ...) and its index; return its entry.
    `progress(n)` is told of every n images encoded."""
    tar_name, entry_name = shard_names(index, cfg.compress)
    out = Path(cfg.output)
    mode = "L" if geom["image_channels"] == 1 else "RGB"
    read, skipped, tars = [], [], {}
    try:
        for offset, item in enumerate(items):
            try:
                data, caption = _read_item(item, tars)
            except ValueError as exc:
                skipped.append((offset, dict(input=item.name, reason=str(exc))))
                continue
            read.append((offset, item, data, caption))
    finally:
        for tar, _ in tars.values():
            tar.close()
    datas = [data for _, _, data, _ in read]
    decoded = _decode_dali(datas, mode, buckets, cfg) if cfg.decoder == "dali" else _decode_pil(datas, mode, buckets)
    keys, pixels, captions, infos = [], [], [], []
    f = geom["factor"]
    for (offset, item, _, caption), got in zip(read, decoded):
        if isinstance(got, ValueError):
            skipped.append((offset, dict(input=item.name, reason=str(got))))
            continue
        image, (height, width), bucket = got
        keys.append(first + offset)
        pixels.append(image)
        captions.append(caption)
        infos.append(dict(original_size=[height, width], bucket=list(bucket),
                          latent_size=[bucket[0] // f, bucket[1] // f], source=item.name))
    skipped = [sk for _, sk in sorted(skipped, key=lambda pair: pair[0])]  # in input order, as listed
    if progress is not None and len(items) > len(keys):
        progress(len(items) - len(keys))  # the skipped inputs are done too
    latents = _encode_latents(pixels, cfg, geom, progress) if pixels else []
    states = _encode_texts(captions, cfg) if captions else []

    raw = io.BytesIO()
    stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if cfg.compress else raw
    rows, bucket_counts = [], {}
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, latent, state, caption, info in zip(keys, latents, states, captions, infos):
            payload, header = _sample_members(latent, state, caption, info)
            at = {suffix: _add_member(tar, f"{key:08d}.{suffix}", payload[suffix]) for suffix in MEMBERS}
            row = [key]
            for suffix in ("latent.npy", "ctx.npy", "mask.npy"):
                row += [at[suffix] + header[suffix], len(payload[suffix]) - header[suffix]]
            ctx_itemsize = np.dtype(np.float16).itemsize  # _sample_members stores the states as float16
            row += [at["txt"], len(payload["txt"]), latent.itemsize, ctx_itemsize, len(state), *info["latent_size"]]
            rows.append(row)
            grid = "x".join(map(str, info["latent_size"]))
            bucket_counts[grid] = bucket_counts.get(grid, 0) + 1
    if cfg.compress:
        stream.close()
    data = raw.getvalue()
    index_bytes = _npy(np.asarray(rows, dtype=np.int64).reshape(len(rows), len(INDEX_COLUMNS)))
    entry = dict(name=tar_name, index=index, count=len(keys), bytes=len(data),
                 sha256=hashlib.sha256(data).hexdigest(), buckets=dict(sorted(bucket_counts.items())),
                 skipped=skipped, signature=signature,
                 sample_index=dict(name=index_name(index), sha256=hashlib.sha256(index_bytes).hexdigest()))
    tmp = out / f"{tar_name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    # the index and the entry first, the tar last: a shard counts as done only once its tar has
    # its final name
    _atomic_write(out / index_name(index), index_bytes)
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
    index_path = out / index_name(index)
    recorded = entry.get("sample_index")
    if not (isinstance(recorded, dict) and index_path.is_file()
            and hashlib.sha256(index_path.read_bytes()).hexdigest() == recorded.get("sha256")):
        return None  # a shard without its index: rebuild both
    return entry


# ------------------------------------------------------------------------------ the whole run

class Ranks:
    """This process among torchrun's (WORLD_SIZE, RANK, LOCAL_RANK; one process: rank 0 of 1).
    Shard s is built by rank s % world; the ranks meet (gloo, so a CPU-only machine can run it)
    only to agree that the folder is ready, and that every shard is done before rank 0 writes
    the manifest. A rank's error reaches every rank there, so none waits forever."""

    # a rank that finished its shards waits for the slowest one: a long job must not time out
    TIMEOUT_DAYS = 7

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None
        self._owned = False

    def start(self) -> None:
        if self.world == 1 or self.group is not None:
            return
        import datetime

        import torch.distributed as dist

        from megatron_apex.parallel.initialize import TIMEOUT_ENV

        seconds = self.TIMEOUT_DAYS * 86400
        if os.environ.get(TIMEOUT_ENV):  # a test harness's shorter limit: a failing rank fails the test fast
            seconds = min(seconds, float(os.environ[TIMEOUT_ENV]))
        timeout = datetime.timedelta(seconds=seconds)
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
            self._owned = True
        self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                                            timeout=timeout)

    def agree(self, error: Optional[BaseException]) -> None:
        """Every rank passes its error (or None); all raise the first rank's error, or all go on."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        errors: list = [None] * self.world
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}",
                               group=self.group)
        if error is not None:
            raise error
        for rank, message in enumerate(errors):
            if message is not None:
                raise ValueError(f"rank {rank} of {self.world} failed: {message}")

    def total(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        values: list = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return sum(values)

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False
        self.group = None


def _worker_init(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


def _build_job(job):
    return build_shard(*job)


def _check_positive(cfg: PrepareConfig) -> None:
    for name in ("samples_per_shard", "workers", "max_text_len", "patch_size", "vae_batch_size", "text_batch_size"):
        value = getattr(cfg, name)
        if name == "max_text_len" and value is None:
            continue  # the text encoder's default, resolved later
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def resolve_config(cfg: PrepareConfig, ranks: Optional[Ranks] = None) -> PrepareConfig:
    """cfg with auto settings made concrete for this process: device, dtype, decoder and the
    text length (the text encoder family's when not given)."""
    from megatron_apex.data.encoders import text_encoder_info

    ranks = ranks or Ranks()
    device = resolve_device(cfg.device, ranks.local_rank, ranks.world)
    max_text_len = cfg.max_text_len
    if max_text_len is None:
        max_text_len = text_encoder_info(cfg.text_encoder, cfg.complex_human_instruction)["default_max_text_len"]
    return dataclasses.replace(cfg, device=device, dtype=resolve_dtype(cfg.dtype, device),
                               decoder=resolve_decoder(cfg.decoder, device), max_text_len=max_text_len)


def _signature(cfg: PrepareConfig, text: dict, items: list[InputItem], buckets: list, geom: dict) -> str:
    """Everything the shards' bytes depend on: inputs and settings, the encoders' device kind,
    dtype and the image decoder (not the GPU's number, nor how many processes build them)."""
    from megatron_apex.data.encoders import read_vae_config

    settings = dict(vae=cfg.vae if cfg.vae == "none" else os.path.abspath(cfg.vae),
                    vae_config=read_vae_config(cfg.vae), text_encoder=text,
                    text_encoder_path=cfg.text_encoder if cfg.text_encoder == "minilm" else os.path.abspath(
                        cfg.text_encoder), resolution=cfg.resolution, patch_size=cfg.patch_size,
                    channels=geom["image_channels"], max_text_len=cfg.max_text_len,
                    samples_per_shard=cfg.samples_per_shard, compress=cfg.compress, buckets=buckets,
                    device=cfg.device.split(":")[0], dtype=cfg.dtype, decoder=cfg.decoder,
                    inputs=[dataclasses.astuple(it) for it in items])
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Write the shards that are missing and the manifest; return a summary dict. Under torchrun
    each process builds its share of the shards and rank 0 writes the manifest."""
    ranks = Ranks()
    try:
        return _prepare(cfg, log, ranks)
    finally:
        ranks.close()


def _prepare(cfg: PrepareConfig, log, ranks: Ranks) -> dict:
    from megatron_apex.data.encoders import text_encoder_info, vae_geometry

    _check_positive(cfg)
    cfg = resolve_config(cfg, ranks)
    geom = vae_geometry(cfg.vae, cfg.channels)
    text = text_encoder_info(cfg.text_encoder, cfg.complex_human_instruction)
    buckets = bucket_table(cfg.resolution, geom["factor"] * cfg.patch_size)
    items, list_skipped = list_inputs(cfg.inputs)
    if not items:
        raise ValueError(f"--input {' '.join(map(str, cfg.inputs))}: no PNG/JPEG images found")
    signature = _signature(cfg, text, items, buckets, geom)
    out = Path(cfg.output)
    ranks.start()
    error = None
    if ranks.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob("*.tmp-*"):  # half-written files of an interrupted run (one run per folder)
                if stale.name.startswith(("shard-", MANIFEST_NAME, EMPTY_PROMPT_FILE)):
                    stale.unlink()
        except OSError as exc:
            error = ValueError(f"--output {out}: {exc.strerror or exc}")
    ranks.agree(error)  # no rank writes before the stale files are gone

    sps = cfg.samples_per_shard
    num_shards = -(-len(items) // sps)
    jobs, error, kept = [], None, 0
    try:
        for s in range(ranks.rank, num_shards, ranks.world):
            if _existing_entry(out, s, cfg.compress, signature) is not None:
                kept += 1
            else:
                jobs.append((cfg, s, s * sps, items[s * sps:(s + 1) * sps], buckets, geom, signature))
        _build_jobs(jobs, cfg, ranks)
    except Exception as exc:  # told to every rank at the meeting below (KeyboardInterrupt ends them all anyway)
        error = exc
    ranks.agree(error)
    written = ranks.total(len(jobs))
    if ranks.rank != 0:
        ranks.agree(None)  # rank 0's manifest
        log(f"[prepare_data] rank {ranks.rank}: {len(jobs)} shards written, {kept} kept -> {out}")
        return dict(samples=None, shards=num_shards, shards_kept=kept, shards_written=len(jobs), skipped=[],
                    manifest=str(out / MANIFEST_NAME))
    try:
        summary = _write_manifest(cfg, out, num_shards, signature, geom, text, buckets, items, list_skipped,
                                  written)
    except Exception as exc:
        ranks.agree(exc)
        raise
    ranks.agree(None)
    summary.update(shards_kept=num_shards - written, shards_written=written)
    skipped = summary["skipped"]
    log(f"[prepare_data] {summary['samples']} samples in {num_shards} shards ({written} written, "
        f"{num_shards - written} kept) -> {out}")
    if skipped:
        log(f"[prepare_data] skipped {len(skipped)} inputs: {_reason_counts(skipped)}")
        for sk in skipped[:20]:
            log(f"[prepare_data]   {sk['input']}: {sk['reason']}")
        if len(skipped) > 20:
            log(f"[prepare_data]   ... and {len(skipped) - 20} more (listed in the shard-*.json entries)")
    return summary


def _build_jobs(jobs: list, cfg: PrepareConfig, ranks: Ranks) -> None:
    """This rank's shards: in this process, or in --workers processes."""
    bar = None
    if cfg.progress and jobs and ranks.rank == 0:
        from tqdm import tqdm

        desc = "prepare_data" if ranks.world == 1 else f"prepare_data (rank 0 of {ranks.world})"
        bar = tqdm(total=sum(len(job[3]) for job in jobs), desc=desc, unit="img", dynamic_ncols=True)
    try:
        if cfg.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // cfg.workers)
            with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs)), _worker_init, (threads,)) as pool:
                for _, job in zip(pool.imap(_build_job, jobs), jobs):
                    if bar is not None:
                        bar.update(len(job[3]))
        else:
            for job in jobs:
                build_shard(*job, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _write_manifest(cfg: PrepareConfig, out: Path, num_shards: int, signature: str, geom: dict, text: dict,
                    buckets: list, items: list, list_skipped: list, written: int) -> dict:
    """Rank 0, once every shard is done: the manifest (and the empty prompt's states)."""
    shards = []
    for s in range(num_shards):
        entry = _existing_entry(out, s, cfg.compress, signature)
        if entry is None:
            raise ValueError(f"--output {out}: {shard_names(s, cfg.compress)[0]} is missing or incomplete after "
                             "every rank finished (another run writing into the same folder?)")
        shards.append(entry)
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
        encoded_with=dict(device=cfg.device.split(":")[0], dtype=cfg.dtype, decoder=cfg.decoder),
        pixel_buckets=[list(b) for b in buckets],
        buckets=[[h // geom["factor"], w // geom["factor"]] for h, w in buckets],
        used_buckets=[list(b) for b in latent_buckets],
        shards=[{k: e[k] for k in ("name", "count", "bytes", "sha256", "buckets", "sample_index")} for e in shards],
        skipped=len(skipped), signature=signature)
    if written or not (out / EMPTY_PROMPT_FILE).is_file():  # for caption dropout and classifier-free guidance
        empty = _encode_texts([EMPTY_PROMPT], cfg, negative=True)[0]
        _atomic_write(out / EMPTY_PROMPT_FILE, _npy(empty.astype(np.float16)))
    _atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return dict(samples=total, shards=num_shards, skipped=skipped, manifest=str(out / MANIFEST_NAME))


def _reason_counts(skipped: list[dict]) -> str:
    counts: dict = {}
    for sk in skipped:
        reason = sk["reason"].split(" (")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none skipped"
