"""Conversion streams: import, export and the merged LoRA export hold a bounded number of
tensors at any moment, whatever the model size (docs/conversion.md, "Streaming and memory").

Hooks count the tensors alive (weak references: a tensor counts until it is freed) at every
read and every write. Whole-dict loading (read everything, then write), a writer that resolves
every item before writing (megatron's own), or a shard buffer all push those counts to the
number of tensors in the model; the limits below are a few tensors, on a model of ~400."""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from megatron_apex.conversion import checkpoint_io, hf_export, hf_import, hf_io, streaming_save  # noqa: E402
from megatron_apex.conversion.random_weights import write_random_diffusers_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=12, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


class Alive:
    """Tensors registered and not yet freed (count and bytes), with the peaks seen."""

    def __init__(self):
        self._alive = {}
        self._next = 0
        self.peak_count = self.peak_bytes = 0

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        token = self._next
        self._next += 1
        self._alive[token] = tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, self._alive.pop, token, None)
        self.sample()
        return tensor

    def sample(self) -> None:
        self.peak_count = max(self.peak_count, len(self._alive))
        self.peak_bytes = max(self.peak_bytes, sum(self._alive.values()))


def read_folder(path) -> dict:
    with hf_io.SafetensorsFolder(str(path)) as folder:
        return {k: folder[k] for k in folder}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "transformer"
    sizes = write_random_diffusers_folder(str(path), "QwenImageTransformer2DModel", ARCH, seed=2,
                                          max_shard_size="300KB")
    assert sizes["bytes"] > 40 * sizes["largest"]  # a model of many tensors: whole-dict shows
    return path, sizes


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt") / "tp2"
    hf_import.import_hf(checkpoint_io.get_family("qwen-image"), str(hf_dir[0]), str(save), 2)
    return save


def test_import_reads_converts_and_writes_one_tensor_at_a_time(hf_dir, tmp_path, monkeypatch):
    path, sizes = hf_dir
    hf_alive, converted, pieces = Alive(), Alive(), Alive()
    events = []
    read = hf_io.SafetensorsFolder.__getitem__

    def counting_read(self, key):
        events.append("read")
        return hf_alive.add(read(self, key))

    def counting_piece(self, key, rank):
        # the writer asks for a piece when it is about to write it: what is alive now is what
        # the streaming holds besides the piece itself
        events.append("write")
        hf_alive.sample()
        converted.sample()
        return pieces.add(piece(self, key, rank))

    piece = streaming_save.PieceSource.piece
    monkeypatch.setattr(hf_io.SafetensorsFolder, "__getitem__", counting_read)
    monkeypatch.setattr(streaming_save.PieceSource, "piece", counting_piece)
    family = checkpoint_io.get_family("qwen-image")
    hf_import.import_hf(family, str(path), str(tmp_path / "ckpt"), 2,
                            on_convert=lambda key, tensor: converted.add(tensor))
    monkeypatch.undo()

    # every HF tensor read once (the zero-initialised target-time embedder reads its source too)
    assert events.count("read") <= len(read_folder(path)) + 4
    # reads and writes interleave: at most one fused group (q, k, v) is read between writes
    runs, run = [], 0
    for event in events:
        run = run + 1 if event == "read" else 0
        runs.append(run)
    assert max(runs) <= 3, max(runs)
    assert hf_alive.peak_count <= 3 and converted.peak_count <= 2 and pieces.peak_count <= 2, \
        (hf_alive.peak_count, converted.peak_count, pieces.peak_count)
    assert converted.peak_bytes + pieces.peak_bytes <= 3 * sizes["largest"]

    # and the checkpoint is right: exported back, it is the HF folder bit for bit
    hf_export.export_hf(family, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    original, exported = read_folder(path), read_folder(tmp_path / "out")
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_export_reads_and_writes_one_group_at_a_time_whatever_the_shard_size(hf_dir, imported, tmp_path,
                                                                           monkeypatch):
    path, sizes = hf_dir
    added, reads, events = Alive(), [], []
    add = hf_io.PlannedSafetensorsWriter.add

    def counting_add(self, key, tensor):
        events.append("write")
        add(self, key, tensor)
        added.add(tensor)

    monkeypatch.setattr(hf_io.PlannedSafetensorsWriter, "add", counting_add)

    def on_read(keys):
        events.append("read")
        reads.append(keys)

    family = checkpoint_io.get_family("qwen-image")
    # the default 5GB: one shard, which a buffering writer would hold entirely
    hf_export.export_hf(family, str(imported), str(tmp_path / "out"), on_read=on_read)
    monkeypatch.undo()

    out = read_folder(tmp_path / "out")
    assert (tmp_path / "out" / hf_io.WEIGHTS_NAME).is_file()
    assert added.peak_count <= 3 and added.peak_bytes <= 3 * sizes["largest"], (added.peak_count, added.peak_bytes)
    # each read is one group of at most the largest tensor's size, and writes follow each read
    assert len(reads) > 2 * ARCH["num_layers"]
    assert all("write" in pair for pair in zip(events, events[1:]) if pair[0] == "read")
    original = read_folder(path)
    assert all(torch.equal(out[k], v) for k, v in original.items())


def test_merged_lora_export_merges_one_weight_at_a_time(hf_dir, tmp_path, monkeypatch):
    """tools/export_lora.py --merged: the folder equals the eager merged_diffusers_state_dict,
    while at most two merged weights exist at once."""
    from megatron_apex.conversion import load_diffusers_state_dict
    from megatron_apex.families.qwen_image import config_from_diffusers
    from megatron_apex.conversion.lora_diffusers import merged_diffusers_state_dict
    from megatron_apex.lora import LoRAConfig, apply_lora, lora_modules
    from megatron_apex.lora import adapters
    from megatron_apex.families import build_model
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)
    hf = read_folder(hf_dir[0])
    config = config_from_diffusers(hf_io.read_config(str(hf_dir[0])), target_time_embedder=False)
    model = build_model(config, backend="local").eval()
    load_diffusers_state_dict(model, hf)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets="all", train_target_time_embedder=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
    reference = merged_diffusers_state_dict(model)

    spec = importlib.util.spec_from_file_location("export_lora_tool", ROOT / "tools" / "export_lora.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    merged = Alive()
    merge = adapters.merged_weight
    monkeypatch.setattr(adapters, "merged_weight", lambda module: merged.add(merge(module)))
    state = {"checkpoint": "ckpt", "iteration": 1, "weights": "model", "lora": {"config": {}},
             "model_name": "qwen-image-tiny", "model_config": {}}
    tool.export_merged(model, state, str(tmp_path / "merged"), "inline", torch.float32, "5GB")
    monkeypatch.undo()

    out = read_folder(tmp_path / "merged")
    assert out.keys() == reference.keys()
    assert all(torch.equal(out[k], v) for k, v in reference.items())
    assert merged.peak_count <= 2 and merged._next > 6 * ARCH["num_layers"], (merged.peak_count, merged._next)
