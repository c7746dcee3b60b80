"""Images of mixed sizes -> tools/prepare_data.py -> examples/pretrain_apex_dit.py, as a user runs them:
the tiny models train on bucketed shards (pixels, tiny random Qwen-Image VAE and DC-AE latents), a
resume and a DP=2 run continue/match the uninterrupted run, a damaged sample is skipped and counted,
and a model that does not fit the data fails with one line naming both flags."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli_run import REPO, child_env, metrics, train
from tiny_vaes import tiny_vae

from megatron_apex.data.builtin import class_names, load_builtin_arrays

PREPARE = REPO / "tools" / "prepare_data.py"
# (height, width) of the PNGs: three aspect ratios, some not bucket sizes (resized and cropped)
SIZES = [(28, 28), (24, 32), (32, 24), (30, 30), (21, 28)]
COMMON = ["--num-layers", "1", "--micro-batch-size", "4", "--global-batch-size", "8", "--objective", "fm"]


def _prepare(inputs, out, *flags):
    proc = subprocess.run([sys.executable, str(PREPARE), "--input", str(inputs), "--output", str(out),
                           "--max-text-len", "16", "--no-progress", *flags],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    images, labels = load_builtin_arrays("fashion-mnist", "train")
    names = class_names("fashion-mnist")
    (root / "in").mkdir()
    for i in range(200):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(images[i]).resize((w, h)).save(root / "in" / f"{i:04d}.png")
        (root / "in" / f"{i:04d}.txt").write_text(f"a photo of a {names[labels[i]].lower()}")
    return root / "in"


@pytest.fixture(scope="module")
def prepared(images):
    out = images.parent / "shards"
    proc = _prepare(images, out, "--vae", "none", "--channels", "1", "--resolution", "28", "--patch-size", "4",
                    "--samples-per-shard", "64", "--workers", "2")
    assert "200 samples in 4 shards" in proc.stdout
    return out


def _grey_autoencoder(class_name, folder):
    """A random tiny Qwen-Image VAE or DC-AE: grey in, one latent channel out (the tiny models'),
    downsampling 2, so 56-pixel buckets give 28-grid latents."""
    tiny_vae(class_name, image_channels=1, latent_channels=1).save_pretrained(folder)
    return folder


def test_qwen_image_vae_latents_train_qwen_image_tiny(images, tmp_path):
    vae = _grey_autoencoder("AutoencoderKLQwenImage", tmp_path / "vae")
    _prepare(images, tmp_path / "latents", "--vae", str(vae), "--resolution", "56", "--patch-size", "4",
             "--samples-per-shard", "100")
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["latent_channels"] == 1 and manifest["vae"]["downsample"] == 2
    assert manifest["vae"]["cls"] == "AutoencoderKLQwenImage"
    assert [28, 28] in manifest["used_buckets"] and len(manifest["used_buckets"]) == 3
    train(["--model", "qwen-image-tiny", "--data-path", str(tmp_path / "latents"), *COMMON, "--train-iters", "2",
           "--save", str(tmp_path / "run")])
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


def test_sana_tiny_trains_on_dc_ae_latents_and_a_damaged_sample_is_counted(images, tmp_path):
    from megatron_apex.data.prepare import PrepareConfig, prepare

    vae = _grey_autoencoder("AutoencoderDC", tmp_path / "vae")
    data = tmp_path / "latents"
    prepare(PrepareConfig(inputs=[str(images)], output=str(data), vae=str(vae), resolution=56, patch_size=4,
                          max_text_len=16, samples_per_shard=100, progress=False), log=lambda m: None)
    assert json.loads((data / "manifest.json").read_text())["vae"]["cls"] == "AutoencoderDC"
    shard = data / "shard-000000.tar"
    blob = bytearray(shard.read_bytes())
    at = blob.index(b"\x93NUMPY")  # the first sample's latent.npy header
    blob[at:at + 6] = b"BROKEN"
    shard.write_bytes(bytes(blob))
    # the shard's index would spare the loader its headers (and the broken one with them): without
    # it the loader scans the shard's headers
    (data / "shard-000000.idx.npy").unlink()
    proc = train(["--model", "sana-tiny", "--data-path", str(data), *COMMON, "--train-iters", "2",
                  "--save", str(tmp_path / "run")])
    assert "skipped" in proc.stdout and "00000000" in proc.stdout
    records = metrics(tmp_path / "run")
    assert [r["data_skipped"] for r in records] == [1, 1]
    assert all(np.isfinite(r["loss"]) for r in records)


@pytest.fixture(scope="module")
def full_run(prepared, tmp_path_factory):
    """4 uninterrupted iterations of qwen-image-tiny on the prepared shards: the reference run."""
    save = tmp_path_factory.mktemp("full")
    train(["--model", "qwen-image-tiny", "--data-path", str(prepared), *COMMON, "--train-iters", "4",
           "--save", str(save)])
    return metrics(save)


def test_qwen_image_tiny_trains_and_resumes_on_prepared_shards(prepared, full_run, tmp_path):
    args = ["--model", "qwen-image-tiny", "--data-path", str(prepared), *COMMON, "--train-iters", "4"]
    assert [r["iteration"] for r in full_run] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["data_skipped"] == 0 for r in full_run)
    # stop at 2 and resume: iterations 3 and 4 see the same batches, noise and weights
    train([*args, "--exit-interval", "2", "--save", str(tmp_path / "part")])
    train([*args, "--save", str(tmp_path / "part"), "--load", str(tmp_path / "part")])
    resumed = {r["iteration"]: r for r in metrics(tmp_path / "part")}
    for r in full_run:
        assert resumed[r["iteration"]]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)
        assert resumed[r["iteration"]]["consumed_samples"] == r["consumed_samples"]


def test_model_that_does_not_fit_the_data_is_one_line(prepared, tmp_path):
    proc = train(["--model", "qwen-image-tiny-test", "--data-path", str(prepared), *COMMON, "--train-iters", "1",
                  "--save", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"--data-path {prepared}" in errors[0] and "--model qwen-image-tiny-test" in errors[0]
    assert "Traceback" not in proc.stderr


def test_two_data_parallel_ranks_match_one_process(prepared, full_run, tmp_path):
    # each rank reads its half of the bucketed global batch; the losses are the single process's
    from dist_utils import run_torchrun

    from cli_run import ENTRY, flags

    args = ["--model", "qwen-image-tiny", "--data-path", str(prepared), *COMMON, "--train-iters", "4",
            "--exit-interval", "2"]
    run_torchrun(ENTRY, 2, flags([*args, "--save", str(tmp_path / "two")]), timeout=600, env=child_env())
    two = metrics(tmp_path / "two")
    assert [r["consumed_samples"] for r in two] == [8, 16]
    for a, b in zip(full_run, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
