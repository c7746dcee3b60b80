"""tools/prepare_data.py's DALI decoder (megatron_apex/data/dali_decode.py) against PIL's: the same
buckets, skip reasons and latents, pixels within the tolerance docs/data.md states.

Needs NVIDIA DALI (the gpu extra's nvidia-dali-cuda120) besides CUDA; without it the tests skip.
With MEGATRON_APEX_GPU_TESTS_ON_CPU=1 they run DALI's CPU operators (the same resampling, libjpeg
instead of nvJPEG)."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vaes import tiny_vae

from megatron_apex.data.prepare import PrepareConfig, prepare

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")

# docs/data.md: DALI's pixels are within 6 levels (of 255) of PIL's, 1 level on average (measured
# with DALI's CPU operators here: at most 5 where a 512-pixel image shrinks 16-fold, 2 elsewhere,
# averages 0.13-0.54; nvJPEG's IDCT may add a level on the GPU)
MAX_LEVELS, MEAN_LEVELS = 6, 1.0
# (height, width) of the inputs: none is a bucket size of --resolution 32 (every one is resized),
# both down- and upscaled, three aspect ratios
SIZES = [(300, 400), (100, 80), (40, 48), (64, 150), (512, 512)]


def _photo(rng, h, w):
    """A smooth RGB image: random colours on a coarse grid, scaled up (photos are smooth too)."""
    coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)


def _inputs(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        image = _photo(rng, h, w)
        if i % 2:
            image.save(folder / f"{i}.png")
        else:
            image.save(folder / f"{i}.jpg", quality=92)
        (folder / f"{i}.txt").write_text(f"picture {i}")
    # EXIF orientation 6 (turned a quarter): both decoders must stand it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(rng, 60, 90).save(folder / "rotated.jpg", quality=92, exif=exif)
    (folder / "rotated.txt").write_text("rotated")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (folder / "broken.txt").write_text("broken")
    return folder


def _prepare(inputs, out, decoder, device, vae="none", channels=3):
    return prepare(PrepareConfig(inputs=[str(inputs)], output=str(out), vae=vae, channels=channels, resolution=32,
                                 patch_size=2, max_text_len=8, samples_per_shard=100, progress=False, device=device,
                                 dtype="float32", decoder=decoder), log=lambda m: None)


def _samples(out):
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})
    return {k: (np.load(io.BytesIO(members[f"{k}.latent.npy"])).astype(np.float32),
                json.loads(members[f"{k}.json"])) for k in keys}


@pytest.fixture(scope="module")
def device_name():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("channels", [3, 1])
def test_dali_pixels_are_pils_within_the_tolerance(tmp_path, device_name, channels):
    inputs = _inputs(tmp_path / "in")
    dali = _prepare(inputs, tmp_path / "dali", "dali", device_name, channels=channels)
    pil = _prepare(inputs, tmp_path / "pil", "pil", device_name, channels=channels)
    assert dali["skipped"] == pil["skipped"] and len(pil["skipped"]) == 1  # broken.png, same reason
    got, ref = _samples(tmp_path / "dali"), _samples(tmp_path / "pil")
    assert sorted(got) == sorted(ref) and len(ref) == len(SIZES) + 1
    for key in ref:
        (a, info_a), (b, info_b) = got[key], ref[key]
        assert info_a == info_b  # original size (EXIF-oriented), bucket, latent size
        levels = np.abs(a - b) * 127.5  # --vae none: the latent is pixels / 127.5 - 1
        # + 0.15: the stored float16 rounds pixel / 127.5 - 1 by up to 0.06 levels each
        assert levels.max() <= MAX_LEVELS + 0.15 and levels.mean() <= MEAN_LEVELS, (key, levels.max(), levels.mean())
    rotated = next(info for _, info in ref.values() if info["source"].endswith("rotated.jpg"))
    assert rotated["original_size"] == [90, 60]


def test_dali_latents_are_pils_within_the_tolerance(tmp_path, device_name):
    """Through a (tiny, random) VAE the pixel differences stay as small: latents within 2% of their range."""
    tiny_vae("AutoencoderKL").save_pretrained(tmp_path / "vae")
    inputs = _inputs(tmp_path / "in")
    _prepare(inputs, tmp_path / "dali", "dali", device_name, vae=str(tmp_path / "vae"))
    _prepare(inputs, tmp_path / "pil", "pil", device_name, vae=str(tmp_path / "vae"))
    got, ref = _samples(tmp_path / "dali"), _samples(tmp_path / "pil")
    assert sorted(got) == sorted(ref)
    for key in ref:
        a, b = got[key][0], ref[key][0]
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 0.02 * (b.max() - b.min()), key
