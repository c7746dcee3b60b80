"""tools/prepare_data.py under torchrun: two processes (gloo, CPU) write the files of one process,
byte for byte, and resume a folder another run left half done."""

import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from cli_run import REPO, child_env
from dist_utils import run_torchrun

PREPARE = REPO / "tools" / "prepare_data.py"
SIZES = [(28, 28), (20, 40), (40, 20), (24, 32), (30, 26)]


def _inputs(folder, n=14):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        if i != 4:  # one input without a caption: skipped, listed in its shard's entry
            (folder / f"{i:03d}.txt").write_text(f"grey picture {i}")
    return folder


def _flags(inputs, out):
    return ["--input", str(inputs), "--output", str(out), "--vae", "none", "--channels", "1", "--resolution", "28",
            "--patch-size", "4", "--max-text-len", "8", "--samples-per-shard", "3", "--device", "cpu",
            "--no-progress"]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_ranks_write_the_bytes_of_one_process_and_resume(tmp_path):
    inputs = _inputs(tmp_path / "in")
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, str(PREPARE), *_flags(inputs, one)], capture_output=True, text=True,
                          env=child_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = _files(one)
    # 14 inputs in shards of 3: 5 shards, each with its tar, entry and index; the manifest and the empty prompt
    assert sum(name.startswith("shard-") for name in reference) == 15 and "manifest.json" in reference

    two = tmp_path / "two"
    result = run_torchrun(PREPARE, 2, _flags(inputs, two), timeout=600)
    assert _files(two) == reference, sorted(n for n in reference if _files(two).get(n) != reference[n])
    assert "rank 1: 2 shards written" in result.stdout  # shards 1 and 3 of 0..4

    # a folder left half done (shard 2 finished, a temporary file of a killed writer): two ranks
    # keep shard 2 as it is and write the rest
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("shard-000002.tar", "shard-000002.json", "shard-000002.idx.npy"):
        shutil.copy2(one / name, resumed / name)
    (resumed / "shard-000000.tar.tmp-99999").write_bytes(b"half a shard")
    before = (resumed / "shard-000002.tar").stat().st_mtime_ns
    result = run_torchrun(PREPARE, 2, _flags(inputs, resumed), timeout=600)
    assert "(4 written, 1 kept)" in result.stdout
    assert (resumed / "shard-000002.tar").stat().st_mtime_ns == before
    assert _files(resumed) == reference
