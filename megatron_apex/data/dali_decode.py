"""Decode, resize and crop images with NVIDIA DALI (optional: the `gpu` extra's
nvidia-dali-cuda120): tools/prepare_data.py's `--decoder dali`, on the GPU (nvJPEG / nvImageCodec
decoding, CUDA resampling), or on the CPU (DALI's threaded CPU operators) without one.

The plan is PIL's (buckets.cover_and_crop): scale the EXIF-oriented image to cover its bucket
with a bicubic, antialiased filter, then take the centre crop. The pixels agree with PIL's within
a tolerance, not bit for bit (docs/data.md: at most 6 levels of 255 apart, 1 on average; DALI's
and PIL's cubic filters are not the same code, and nvJPEG's IDCT is not libjpeg's).

Only megatron_apex/data/prepare/ imports this module; nvidia.dali itself is imported only when DALI is asked for.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

BATCH = 32  # images per DALI run; each image is resized on its own, so the pixels do not depend on it


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its libraries
        return False
    return True


class DaliDecoder:
    """`decode(datas, plans) -> [uint8 (h, w) or (h, w, 3)]`: each encoded image decoded (grey
    with `channels=1`), resized to (new_h, new_w) and cropped to (h, w) at (top, left), as
    plans[i] = (new_h, new_w, top, left, h, w) says. `device_id=None` runs DALI's CPU operators."""

    def __init__(self, channels: int, device_id: Optional[int] = None, num_threads: int = 4):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = device_id is not None
        out_type = types.GRAY if channels == 1 else types.RGB

        # synchronous (no prefetching): every run takes exactly the batch fed to it
        @pipeline_def(batch_size=BATCH, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipeline():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            size_x = fn.external_source(name="size_x", dtype=types.FLOAT, ndim=0)
            size_y = fn.external_source(name="size_y", dtype=types.FLOAT, ndim=0)
            anchor = fn.external_source(name="anchor", dtype=types.INT64, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT64, ndim=1)
            image = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=out_type)
            image = fn.resize(image, resize_x=size_x, resize_y=size_y, interp_type=types.INTERP_CUBIC,
                              antialias=True)
            return fn.slice(image, anchor, shape, axis_names="HW")

        self.channels = channels
        self._pipeline = pipeline
        self.pipe = None

    def decode(self, datas: Sequence[bytes], plans: Sequence[tuple]) -> list[np.ndarray]:
        """At most BATCH images; an image DALI cannot decode fails the whole call (the caller
        decodes those with PIL), and the next call starts a fresh pipeline."""
        if len(datas) > BATCH:
            raise ValueError(f"DaliDecoder.decode takes at most {BATCH} images, got {len(datas)}")
        if self.pipe is None:
            self.pipe = self._pipeline()
            self.pipe.build()
        try:
            self.pipe.feed_input("data", [np.frombuffer(d, dtype=np.uint8) for d in datas])
            self.pipe.feed_input("size_x", [np.float32(p[1]) for p in plans])
            self.pipe.feed_input("size_y", [np.float32(p[0]) for p in plans])
            self.pipe.feed_input("anchor", [np.array(p[2:4], dtype=np.int64) for p in plans])
            self.pipe.feed_input("shape", [np.array(p[4:6], dtype=np.int64) for p in plans])
            (images,) = self.pipe.run()
        except Exception:
            self.pipe = None  # DALI leaves a pipeline that failed unusable
            raise
        if hasattr(images, "as_cpu"):
            images = images.as_cpu()
        out = []
        for j in range(len(datas)):
            image = np.array(images[j])
            out.append(np.ascontiguousarray(image[..., 0]) if self.channels == 1 else image)
        return out
