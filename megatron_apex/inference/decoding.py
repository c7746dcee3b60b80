"""Latents back to pixels: the inverse of megatron_apex/data/encoders.py's `encode_images`, as the
diffusers pipelines decode.

- AutoencoderKLQwenImage: z = latents * latents_std[c] + latents_mean[c], decoded as a one-frame
  video, frame 0 (QwenImagePipeline);
- AutoencoderDC: decode(latents / scaling_factor) (SanaPipeline);
- AutoencoderKL: decode(latents / scaling_factor + shift_factor) (the SD/FLUX pipelines);
- no VAE (`none`): the latents are the pixels.

``geom`` is `encoders.vae_geometry`'s dict (a latent_shards.v1 manifest records the same keys
under `vae`). Pixels come back in [-1, 1] (unclamped; `to_uint8` clamps as the pipelines'
image processor does).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# the normalisation keys of each class: a VAE decodes a dataset's latents only when they agree
NORMALISATION = {"AutoencoderKL": ("scaling_factor", "shift_factor"), "AutoencoderDC": ("scaling_factor",),
                 "AutoencoderKLQwenImage": ("latents_mean", "latents_std"), "none": ()}
GEOMETRY_KEYS = ("cls", "factor", "latent_channels", "image_channels")


def decode_latents(vae, geom: dict, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(B, c, h, w) normalised latents -> (B, C, h*f, w*f) float32 pixels in about [-1, 1] on the
    host; ``vae`` (None for `none`) decodes on its own device and dtype, ``batch_size`` at a time."""
    if vae is None:
        return latents.float().cpu()
    param = next(vae.parameters())
    parts = [_decode_batch(vae, geom, latents[i:i + batch_size].to(param.device, param.dtype))
             for i in range(0, latents.shape[0], batch_size)]
    return torch.cat(parts).float().cpu()


@torch.inference_mode()
def _decode_batch(vae, geom: dict, z: torch.Tensor) -> torch.Tensor:
    cls = geom["cls"]
    if cls == "AutoencoderKLQwenImage":
        mean = torch.tensor(geom["latents_mean"], device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(geom["latents_std"], device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return vae.decode(z[:, :, None] * std + mean, return_dict=False)[0][:, :, 0]
    if cls == "AutoencoderDC":
        return vae.decode(z / geom["scaling_factor"], return_dict=False)[0]
    if cls == "AutoencoderKL":
        return vae.decode(z / geom["scaling_factor"] + geom["shift_factor"], return_dict=False)[0]
    raise ValueError(f"no decoder for a VAE of class {cls!r}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (values outside [-1, 1] clamped)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def geometry_mismatch(ours: dict, recorded: dict) -> Optional[str]:
    """Why a VAE of geometry ``ours`` cannot decode latents encoded with ``recorded`` (a
    manifest's `vae`), or None when it can: class, downsampling, channels and normalisation."""
    diffs = []
    for key in GEOMETRY_KEYS + NORMALISATION.get(recorded.get("cls"), ()):
        a, b = ours.get(key), recorded.get(key)
        if key == "factor" and b is None:
            b = recorded.get("downsample")
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            diffs.append(f"{key} {a!r} vs the data's {b!r}")
    return "; ".join(diffs) or None
