"""Checkpoint pickles are refused before they can run code; tar member names cannot leave their
archive."""

import os
import pickle

import pytest
import torch

from megatron_apex import checkpoint
from megatron_apex.checkpoint import UnsafePickleError, load_data_pickle
from megatron_apex.untrusted import safe_member_name


class _Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _checkpoint_dir(tmp_path):
    """A real torch DCP checkpoint (the format megatron's dist_checkpointing writes)."""
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "iter_0000001"
    dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, checkpoint_id=str(ckpt))
    return ckpt


def test_real_dcp_metadata_loads(tmp_path):
    ckpt = _checkpoint_dir(tmp_path)
    metadata = load_data_pickle(str(ckpt / ".metadata"))
    assert metadata.state_dict_metadata["w"].size == torch.Size([2, 3])


def test_the_payload_is_live_under_plain_pickle(tmp_path):
    # the control: without the guard this file runs code
    pickle.loads(pickle.dumps(_Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").is_dir()


@pytest.mark.parametrize("victim", [".metadata", "common.pt"])
def test_a_planted_payload_is_refused_without_running(tmp_path, victim):
    ckpt = _checkpoint_dir(tmp_path)
    marker = tmp_path / "ran"
    payload = _Payload(marker)
    if victim == "common.pt":
        torch.save({"payload": payload}, ckpt / victim)
    else:
        (ckpt / victim).write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError) as err:
        checkpoint.load_checkpoint(str(ckpt), {})
    assert str(ckpt / victim) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "..", "C:/x", "\\\\host\\x"])
def test_member_names_leaving_the_archive_are_refused(name):
    with pytest.raises(ValueError, match="outside the archive"):
        safe_member_name(name, "shard-000000.tar")


@pytest.mark.parametrize("name, expected", [("0000001.ctx.npy", "0000001.ctx.npy"), ("a/./b.txt", "a/b.txt"),
                                            ("a/../b.txt", "b.txt")])
def test_member_names_inside_the_archive_pass(name, expected):
    assert safe_member_name(name, "shard.tar") == expected
