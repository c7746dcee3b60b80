"""tools/convert_hf.py import/export show a per-tensor progress bar on a terminal: it counts
exactly the tensors converted (import) and written (export), and stays silent off a terminal
or with --no-progress."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from megatron_apex.conversion import hf_io  # noqa: E402
from megatron_apex.conversion.random_weights import write_random_diffusers_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_hf_progress", ROOT / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "transformer"
    write_random_diffusers_folder(str(path), "QwenImageTransformer2DModel", ARCH, seed=3)
    return path


def final_count(stderr: str, desc: str):
    """(n, total) of the bar's last refresh, read off tqdm's `desc: ...| n/total [` text."""
    found = re.findall(rf"{desc}: .*?\| *(\d+)/(\d+) \[", stderr)
    assert found, f"no {desc} bar in {stderr!r}"
    return tuple(int(x) for x in found[-1])


def test_bars_count_the_tensors_converted_and_written(tool, hf_dir, tmp_path, capsys, monkeypatch):
    from megatron_apex.conversion import streaming_save

    converted = []  # counted where the import converts, independently of the bar's hook
    convert = streaming_save.PieceSource._convert

    def counting(self, key):
        converted.append(key)
        return convert(self, key)

    monkeypatch.setattr(streaming_save.PieceSource, "_convert", counting)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert tool.main(["import", "--hf-path", str(hf_dir), "--save", str(tmp_path / "ckpt")]) == 0
    n, total = final_count(capsys.readouterr().err, "import")
    assert n == total == len(converted) == len(set(converted)) > 10

    assert tool.main(["export", "--load", str(tmp_path / "ckpt"), "--hf-path", str(tmp_path / "hf")]) == 0
    with hf_io.SafetensorsFolder(str(tmp_path / "hf")) as folder:
        written = len(list(folder))
    n, total = final_count(capsys.readouterr().err, "export")
    assert n == total == written > 10


@pytest.mark.parametrize("terminal,flag", [(False, []), (True, ["--no-progress"])])
def test_no_bar_off_a_terminal_or_with_no_progress(tool, hf_dir, tmp_path, capsys, monkeypatch, terminal, flag):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert tool.main(["import", "--hf-path", str(hf_dir), "--save", str(tmp_path / "ckpt"), *flag]) == 0
    assert tool.main(["export", "--load", str(tmp_path / "ckpt"), "--hf-path", str(tmp_path / "hf"), *flag]) == 0
    err = capsys.readouterr().err
    assert "import:" not in err and "export:" not in err and "tensor/s" not in err


def test_sampling_shows_one_bar_step_per_batch(capsys, monkeypatch):
    """tools/sample.py's sampler bar (and export_lora.py --merged, through the export writer
    above) counts what it does: here the batches of samplers.sample_seeded."""
    import torch

    from megatron_apex.inference.samplers import sample_seeded

    class Still(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.calls = 0

        def forward(self, x, t, context, context_mask=None, fake_condition=False, t_target=None):
            self.calls += 1
            return x * self.w

    model = Still()
    sample_seeded(model, torch.zeros(10, 3, 4), None, (1, 2, 2), nfe=1, batch_size=4, progress=True)
    n, total = final_count(capsys.readouterr().err, "sample NFE=1")
    assert n == total == model.calls == 3
    sample_seeded(model, torch.zeros(10, 3, 4), None, (1, 2, 2), nfe=1, batch_size=4)
    assert "sample NFE=1" not in capsys.readouterr().err
