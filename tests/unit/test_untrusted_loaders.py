"""Every loader a user can point at a checkpoint reads it as data: a pickle planted in any kind
of item a checkpoint holds never runs, and the loader either loads safely or stops with one
line naming the file.

The planted pickle creates a directory when unpickled with code-running power: its absence
after each loader ran is the proof. The control test shows the same planted item DOES run
under torch's own reader, so a loader that forgot the guard would fail here.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("untrusted_loaders_bad_inputs", REPO / "tests/unit/test_bad_inputs.py")
bad_inputs = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
if not hasattr(bad_inputs, "Assets"):
    _spec.loader.exec_module(bad_inputs)


class Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _storage(ckpt: Path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_apex.checkpoint import load_data_pickle

    metadata = load_data_pickle(str(ckpt / ".metadata"))
    for index, info in metadata.storage_data.items():
        yield index, info, isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)


def _byte_item_kinds(ckpt: Path):
    """One byte item per kind: items are told apart by what holds them (model / ema / teacher /
    optimizer) and the attribute they store."""
    kinds = {}
    for index, info, is_bytes in _storage(ckpt):
        if is_bytes:
            name = index.fqn.split("/")[0]
            kinds.setdefault((name.split(".")[0], name.rsplit(".", 1)[-1]), index.fqn)
    return sorted(kinds.values())


def _plant_in_item(ckpt: Path, fqn: str, payload: bytes) -> str:
    for index, info, _ in _storage(ckpt):
        if index.fqn == fqn:
            assert len(payload) <= info.length, (fqn, len(payload), info.length)
            with open(ckpt / info.relative_path, "r+b") as f:  # the attack: `.metadata` untouched
                f.seek(info.offset)
                f.write(payload)
            return info.relative_path
    raise KeyError(fqn)


def _first_tensor_item(ckpt: Path, min_length: int) -> str:
    return next(index.fqn for index, info, is_bytes in _storage(ckpt) if not is_bytes and info.length >= min_length)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return bad_inputs.Assets(tmp_path_factory.mktemp("untrusted_loaders"))


@pytest.fixture(scope="module")
def hf_export(assets):
    """The clean base as a diffusers folder: what `convert_hf.py verify` compares the victim to."""
    out = assets.root / "hf_export"
    assert bad_inputs.convert("export", "--load", assets.base, "--hf-path", out) in (None, 0)
    return out


def plant(victim: Path, kind: str, marker: Path) -> str:
    """Plant the payload into ``kind`` of the checkpoint ``victim`` (an iter_* directory);
    returns the file name a clear error must name."""
    payload = pickle.dumps(Payload(marker))
    if kind in (".metadata", "train_state.json", "metadata.json"):
        (victim / kind).write_bytes(payload)
        return kind
    if kind == "common.pt":
        torch.save({"payload": Payload(marker)}, victim / kind)
        return kind
    if kind.startswith("byte item "):
        return _plant_in_item(victim, kind[len("byte item "):], payload)
    assert kind == "tensor item"
    return _plant_in_item(victim, _first_tensor_item(victim, len(payload)), payload)


LOADERS = {
    "train --load": lambda a, v, tmp, hf: bad_inputs.train(a, "--load", v, "--save", tmp / "run"),
    "train --pretrained-checkpoint": lambda a, v, tmp, hf: bad_inputs.train(a, "--pretrained-checkpoint", v,
                                                                            "--save", tmp / "run"),
    "train LoRA base": lambda a, v, tmp, hf: bad_inputs.train(a, *bad_inputs.LORA_FLAGS, "--pretrained-checkpoint",
                                                              v, "--save", tmp / "run"),
    "sample.py --load": lambda a, v, tmp, hf: bad_inputs.sample(a, v),
    "convert_hf.py export": lambda a, v, tmp, hf: bad_inputs.convert("export", "--load", v, "--hf-path", tmp / "hf"),
    "convert_hf.py verify": lambda a, v, tmp, hf: bad_inputs.convert("verify", "--hf-path", hf, "--load", v),
    "export_lora.py base": lambda a, v, tmp, hf: bad_inputs.export_lora(a, tmp, "--load", a.lora,
                                                                        "--pretrained-checkpoint", v),
    "inference.loading": lambda a, v, tmp, hf: _load_for_inference(v),
}


def _load_for_inference(victim):
    from megatron_apex.inference.loading import load_model_for_inference

    load_model_for_inference(str(victim), weights="model")


def _kinds():
    return [".metadata", "common.pt", "metadata.json", "train_state.json", "tensor item", "byte items"]


@pytest.mark.parametrize("kind", _kinds())
def test_a_planted_pickle_never_runs_in_any_loader(assets, hf_export, tmp_path, kind):
    clean = Path(assets.base) / "iter_0000001"
    kinds = [f"byte item {fqn}" for fqn in _byte_item_kinds(clean)] if kind == "byte items" else [kind]
    assert kinds, "the checkpoint holds no byte items to plant into"
    for item_kind in kinds:
        refused = []
        for name, loader in LOADERS.items():
            work = tmp_path / f"{len(os.listdir(tmp_path))}"
            work.mkdir()
            victim = work / "victim"
            shutil.copytree(assets.base, victim)
            marker = work / "payload_ran"
            planted = plant(victim / "iter_0000001", item_kind, marker)
            out = bad_inputs.observe(lambda: loader(assets, victim, work, hf_export))
            assert not marker.exists(), f"{item_kind} via {name}: the payload ran"
            if out.kind == "no error":  # a loader that never reads the item (export reads tensors only)
                continue
            refused.append(name)
            assert out.clear, f"{item_kind} via {name}: {out.kind}: {out.message}"
            message = out.message.strip()
            assert "\n" not in message, f"{item_kind} via {name}: {message}"
            assert f"iter_0000001/{planted}" in message, f"{item_kind} via {name}: {message}"
        # the item is read somewhere: resuming and sampling need every item of the model
        assert {"train --load", "sample.py --load", "inference.loading"} <= set(refused), (item_kind, refused)


def test_control_torch_reader_runs_a_planted_byte_item(assets, tmp_path):
    """Without the guard the planted item runs: megatron-core's load of the same victim."""
    from megatron.core import dist_checkpointing

    from megatron_apex.inference.loading import load_model_for_inference

    clean = Path(assets.base) / "iter_0000001"
    victim = tmp_path / "iter_0000001"
    shutil.copytree(clean, victim)
    marker = tmp_path / "payload_ran"
    _plant_in_item(victim, _byte_item_kinds(clean)[0], pickle.dumps(Payload(marker)))
    model = load_model_for_inference(str(clean), weights="model")[0]
    try:
        dist_checkpointing.load({"model": model.sharded_state_dict(prefix="model.")}, str(victim))
    except BaseException:  # noqa: BLE001 - what follows the payload does not matter: it ran
        pass
    assert marker.exists()


def test_truncated_and_corrupt_data_files_get_one_line_naming_the_file(assets, tmp_path):
    from megatron_apex.inference.loading import load_model_for_inference

    clean = Path(assets.base) / "iter_0000001"
    data_file = sorted(p.name for p in clean.iterdir() if p.suffix == ".distcp")[-1]
    for how in ("truncated", "zeroed"):
        victim = tmp_path / how
        shutil.copytree(assets.base, victim)
        path = victim / "iter_0000001" / data_file
        data = path.read_bytes()
        if how == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:  # same length, the middle of the file overwritten: only reading the items finds it
            path.write_bytes(data[: len(data) // 4] + bytes(len(data) // 2) + data[len(data) // 4 + len(data) // 2:])
        with pytest.raises(ValueError) as err:
            load_model_for_inference(str(victim), weights="model")
        message = str(err.value)
        assert f"iter_0000001/{data_file}" in message and "\n" not in message, message


def test_the_metadata_allowlist_names_classes_not_modules(tmp_path):
    """A class that lives in an allowed DCP module but is not checkpoint data is refused."""
    from megatron_apex.checkpoint import UnsafePickleError, load_data_pickle

    class Smuggle:
        def __reduce__(self):
            from torch.distributed.checkpoint.filesystem import FileSystemWriter

            return (FileSystemWriter, (str(tmp_path / "writer_ran"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Smuggle()))
    with pytest.raises(UnsafePickleError, match="FileSystemWriter"):
        load_data_pickle(str(tmp_path / ".metadata"))
    assert not (tmp_path / "writer_ran").exists()


def test_evaluate_refuses_pickled_sample_arrays(tmp_path):
    """tools/evaluate.py reads the samples a user hands it: an object array never unpickles."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "samples.npz"
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue())
        z.writestr("labels.npy", _npy(np.zeros(1, dtype=np.int64)))
    out = bad_inputs.observe(lambda: bad_inputs.evaluate(path))
    assert not marker.exists()
    assert out.clear and "samples.npz" in out.message and "\n" not in out.message.strip(), out


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("how", ["symlink out", "hard link", "index names a file outside"])
def test_an_hf_folder_that_leads_outside_itself_is_refused_naming_the_file(assets, tmp_path, how):
    import json

    src = tmp_path / "transformer"
    shutil.copytree(assets.hf_folder, src)
    weights = src / "diffusion_pytorch_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    if how == "symlink out":
        weights.symlink_to(outside)
        named = weights
    elif how == "hard link":
        os.link(outside, weights)
        named = weights
    else:
        from safetensors import safe_open

        with safe_open(str(outside), "pt") as f:
            keys = list(f.keys())
        (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}))
        named = src / "../elsewhere.safetensors"
    for verb in ("import", "verify"):
        argv = ["--save", tmp_path / "out"] if verb == "import" else ["--model", "qwen-image"]
        out = bad_inputs.observe(lambda: bad_inputs.convert(verb, "--hf-path", src, *argv))
        assert out.clear and str(named) in out.message and "\n" not in out.message.strip(), (verb, out)
        assert not (tmp_path / "out").exists()
