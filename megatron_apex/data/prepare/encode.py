"""From bytes to arrays: images decoded, EXIF-oriented and resized to their bucket (PIL, or NVIDIA
DALI when --decoder dali), then encoded by the VAE (or kept as pixels) and the captions by the
text encoder. Both encoders are loaded once per process."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from megatron_apex.data import dali_decode, encoders
from megatron_apex.data.buckets import cover_and_crop, nearest_bucket, resize_to_bucket
from megatron_apex.data.prepare.config import PrepareConfig


# ------------------------------------------------------------------------------ decoding

def _undecodable(exc: Exception) -> ValueError:
    # the exception's type, not its text: PIL's texts name object addresses, and the reason is
    # stored in the shard's entry, which must come out byte-identical on a rerun
    return ValueError(f"undecodable image ({type(exc).__name__})")


def _pil_image(data: bytes, mode: str):
    """The decoded, EXIF-oriented PIL image in `mode`; ValueError (the skip reason) if undecodable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image).convert(mode)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise _undecodable(exc) from None


def _oriented_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the EXIF-oriented image from its header alone (no pixel decoding)."""
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
        _DECODERS.clear()
        device_id = int(cfg.device.split(":")[1]) if cfg.device.startswith("cuda") else None
        _DECODERS[key] = dali_decode.DaliDecoder(channels, device_id=device_id)
    return _DECODERS[key]


def decode_pil(datas: list[bytes], mode: str, buckets: list) -> list:
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


def decode_dali(datas: list[bytes], mode: str, buckets: list, cfg: PrepareConfig) -> list:
    """decode_pil's result through DALI: sizes from the headers, then decode, resize and crop in
    batches; a batch DALI cannot decode (a damaged or unusual file in it) goes through PIL, which
    also gives the skip reasons."""
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
    for start in range(0, len(todo), dali_decode.BATCH):
        part = todo[start:start + dali_decode.BATCH]
        try:
            pixels = decoder.decode([datas[i] for i, _, _, _ in part], [plan for _, _, _, plan in part])
        except Exception:  # DALI's errors are RuntimeErrors naming its operators; PIL names the file's fault
            pixels = None
        for k, (i, size, bucket, _) in enumerate(part):
            out[i] = (pixels[k], size, bucket) if pixels is not None else decode_pil([datas[i]], mode, buckets)[0]
    return out


# ------------------------------------------------------------------------------ encoding

_ENCODERS: dict = {}


def _encoders(cfg: PrepareConfig):
    """(vae or None, text encoder), loaded once per process on cfg.device in cfg.dtype."""
    key = (cfg.vae, cfg.text_encoder, cfg.device, cfg.dtype, cfg.complex_human_instruction)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = (encoders.load_vae(cfg.vae, device=cfg.device, dtype=cfg.dtype),
                          encoders.load_text_encoder(cfg.text_encoder, device=cfg.device, dtype=cfg.dtype,
                                                     complex_human_instruction=cfg.complex_human_instruction))
    return _ENCODERS[key]


def encode_latents(pixels: list[np.ndarray], cfg: PrepareConfig, geom: dict, progress=None) -> list[np.ndarray]:
    """uint8 (h, w[, c]) arrays -> float16 (C, h/f, w/f): pixels in [-1, 1] or VAE latents.

    Same-shape images are encoded together in batches of --vae-batch-size, in input order, so a
    shard's batches (hence its bytes) depend only on its own inputs."""
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
            batch = torch.from_numpy(np.stack([chw[i] for i in part]))
            z = encoders.encode_images(vae, geom, batch).cpu().numpy()
            for j, i in enumerate(part):
                out[i] = z[j].astype(np.float16)
            if progress is not None:
                progress(len(part))
    return out


def encode_texts(captions: list[str], cfg: PrepareConfig, negative: bool = False) -> list[np.ndarray]:
    _, text_encoder = _encoders(cfg)
    out = []
    for start in range(0, len(captions), cfg.text_batch_size):
        out.extend(text_encoder.encode(captions[start:start + cfg.text_batch_size], cfg.max_text_len,
                                       negative=negative))
    return out
