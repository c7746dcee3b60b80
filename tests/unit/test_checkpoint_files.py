"""Which checkpoint --load takes, and what --keep-last deletes, on hand-made save directories
(a complete checkpoint is an iter_* directory holding train_state.json). A directory with no
complete checkpoint: tests/unit/test_bad_inputs.py (ckpt-* rows)."""

import pytest

from megatron_apex import checkpoint


def _save_dir(tmp_path, complete=(), partial=(), latest=None):
    save = tmp_path / "save"
    save.mkdir()
    for it in complete:
        d = save / f"iter_{it:07d}"
        d.mkdir()
        (d / "train_state.json").write_text("{}")
    for name in partial:  # a save killed before its rename, or a directory without train_state
        (save / name).mkdir()
    if latest is not None:
        (save / "latest").write_text(latest)
    return save


def test_latest_marker_names_the_newest_complete_checkpoint(tmp_path):
    save = _save_dir(tmp_path, complete=(2, 4), partial=(".tmp_iter_0000006",), latest="4\n")
    notes = []
    assert checkpoint.resolve_checkpoint(str(save), log=notes.append) == str(save / "iter_0000004")
    assert notes == []


@pytest.mark.parametrize("latest", ["2\n", None, "garbage", "9\n"])
def test_a_stale_missing_or_broken_marker_falls_back_to_the_newest_complete(tmp_path, latest):
    # e.g. killed between publishing iter_4 and moving the marker
    save = _save_dir(tmp_path, complete=(2, 4), partial=("iter_0000006",), latest=latest)
    notes = []
    assert checkpoint.resolve_checkpoint(str(save), log=notes.append) == str(save / "iter_0000004")
    assert len(notes) == 1 and "iteration 4" in notes[0] and str(save) in notes[0]


def test_keep_last_deletes_the_oldest_complete_checkpoints_only(tmp_path):
    save = _save_dir(tmp_path, complete=(2, 4, 6, 8), partial=(".tmp_iter_0000010",), latest="8\n")
    assert checkpoint.prune_checkpoints(str(save), 2) == [2, 4]
    assert sorted(p.name for p in save.iterdir()) == [".tmp_iter_0000010", "iter_0000006", "iter_0000008", "latest"]
    assert checkpoint.prune_checkpoints(str(save), 2) == []
    with pytest.raises(ValueError, match="--keep-last"):
        checkpoint.prune_checkpoints(str(save), 0)
