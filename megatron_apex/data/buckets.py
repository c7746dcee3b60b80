"""Aspect-ratio buckets: a small table of (height, width) of about equal area per resolution.

Each image goes to the bucket whose aspect ratio is closest to its own (in log ratio, so 2:1
and 1:2 are equally far from 1:1), is scaled to cover it and centre-cropped. Bucket sides are
multiples of `multiple` (the VAE's downsampling x the model's patch size), so every latent
grid is patchifiable.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# height / width ratios of the table; a symmetric set keeps portrait and landscape alike
ASPECT_RATIOS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)


def bucket_table(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(h, w) buckets of area ~resolution**2, sides multiples of `multiple`, sorted, distinct."""
    if not (isinstance(resolution, int) and resolution >= 1):
        raise ValueError(f"--resolution must be a positive integer, got {resolution!r}")
    if not (isinstance(multiple, int) and multiple >= 1):
        raise ValueError(f"the bucket multiple must be a positive integer, got {multiple!r}")
    if resolution < multiple:
        raise ValueError(f"--resolution {resolution} is smaller than the bucket multiple {multiple} "
                         "(VAE downsampling x --patch-size)")
    out = set()
    for ratio in ASPECT_RATIOS:
        h = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
        w = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
        out.add((int(h), int(w)))
    return sorted(out)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio; ties go to the larger area, then the first."""
    target = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def cover_and_crop(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): the size an image of (height, width) is scaled to so that it
    covers the bucket, and the corner of the bucket-sized centre crop of it. Every decoder (PIL
    here, DALI in dali_decode.py) resizes and crops by this one plan."""
    h, w = bucket
    scale = max(h / height, w / width)
    new_w, new_h = max(w, round(width * scale)), max(h, round(height * scale))
    return new_h, new_w, (new_h - h) // 2, (new_w - w) // 2


def resize_to_bucket(image, bucket: tuple[int, int]) -> np.ndarray:
    """PIL image -> uint8 array (H, W[, C]) of exactly the bucket size: cover, then centre-crop."""
    h, w = bucket
    new_h, new_w, top, left = cover_and_crop(image.height, image.width, bucket)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, top, left + w, top + h)))
