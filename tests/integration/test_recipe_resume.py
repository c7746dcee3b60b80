"""A recipe killed mid-run and run again with the same command continues where it stopped: the
losses equal an uninterrupted run's bit for bit, the first start's weights come from BASE, and
nothing the killed run wrote is lost (its complete checkpoints stay byte for byte, its metrics
up to the resumed iteration line for line). Runs examples/recipes/qwen_image_20b_full.sh itself,
through _launch.sh and torchrun, at --tiny size (one process)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from cli_run import REPO, child_env, metrics
from dist_utils import free_port
from megatron_apex.training.metrics_log import _iteration_of
from test_reliability import _children, _last_iteration, _wait

pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through /proc")

RECIPE = "examples/recipes/qwen_image_20b_full.sh"
ITERS, SAVE_INTERVAL = 8, 2  # --tiny's
COMPARED = ("loss", "l_base", "l_fake", "l_dm", "grad_norm", "lr", "consumed_samples")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """BASE as a user makes it: a diffusers folder (random bf16 weights of the tiny model)
    imported with tools/convert_hf.py."""
    from megatron_apex.conversion.random_weights import write_random_diffusers_folder
    from megatron_apex.families import get_model_config, qwen_image

    root = tmp_path_factory.mktemp("base")
    arch = dict(qwen_image.config_to_diffusers(get_model_config("qwen-image-tiny")))
    write_random_diffusers_folder(str(root / "hf"), arch.pop("_class_name"), arch, seed=1, dtype=torch.bfloat16)
    subprocess.run([sys.executable, "tools/convert_hf.py", "import", "--hf-path", str(root / "hf"), "--save",
                    str(root / "ckpt")], check=True, capture_output=True, env=child_env(), cwd=REPO)
    return root / "ckpt"


def recipe(base, save, **popen) -> subprocess.Popen:
    env = {**child_env(), "PYTHON": sys.executable, "BASE": str(base), "SAVE": str(save),
           "MASTER_PORT": str(free_port())}
    return subprocess.Popen(["bash", RECIPE, "--tiny", "--no-progress"], env=env, cwd=REPO, start_new_session=True,
                            **popen)


def run_to_the_end(base, save) -> str:
    proc = recipe(base, save, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_the_node(pid: int) -> None:
    """SIGKILL the launcher and everything under it at once, as a lost node: torchrun starts its
    workers in sessions of their own, which a kill of the launcher's process group misses."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += _children(tree[-1])
    for p in tree:
        os.kill(p, signal.SIGKILL)


def complete_checkpoints(save) -> dict:
    """{iter_* name: sha256 over its files} for each complete checkpoint."""
    found = {}
    for ckpt in sorted(save.glob("iter_*")):
        if (ckpt / "train_state.json").is_file():
            digest = hashlib.sha256()
            for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
                digest.update(f.relative_to(ckpt).as_posix().encode() + f.read_bytes())
            found[ckpt.name] = digest.hexdigest()
    return found


def read_tensor(ckpt, key: str) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata[key]
    tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load({key: tensor}, storage_reader=reader, no_dist=True)
    return tensor.float()


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference") / "run"
    out = run_to_the_end(base, save)
    assert f"--load {save} holds no checkpoint yet: first start, from the weights of --pretrained-checkpoint" in out
    return save


def test_the_first_start_takes_the_base_weights(base, reference):
    """Two updates at the recipe's lr move the weights by far less than they differ from any
    other initialisation: iteration 2's weights are the base's, plus a little."""
    key = "model.img_in.weight"
    start = read_tensor(base / "iter_0000000", key)
    trained = read_tensor(reference / "iter_0000002", key)
    assert 0 < (trained - start).abs().max() < 1e-2 * start.abs().max()


def test_killed_recipe_rerun_continues_and_loses_nothing(base, reference, tmp_path):
    save = tmp_path / "run"
    proc = recipe(base, save, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(18)
    target = rng.randint(SAVE_INTERVAL + 1, ITERS - 2)  # after a checkpoint, before the end
    alive = _wait(proc, lambda: _last_iteration(save) >= target, f"iteration {target}")
    kill_the_node(proc.pid)
    proc.wait()
    assert alive, "the run ended before it could be killed"
    killed_checkpoints = complete_checkpoints(save)
    resume_at = max(int(name[len("iter_"):]) for name in killed_checkpoints)
    killed_log = (save / "metrics.jsonl").read_text().splitlines(keepends=True)

    out = run_to_the_end(base, save)
    assert f"resumed from {save / f'iter_{resume_at:07d}'} (iteration {resume_at})" in out
    assert "first start" not in out and "fine-tuning from the weights" not in out

    got, want = metrics(save), metrics(reference)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == list(range(1, ITERS + 1))
    for g, w in zip(got, want):
        assert {k: g[k] for k in COMPARED} == {k: w[k] for k in COMPARED}, g["iteration"]  # bitwise on CPU
    after = complete_checkpoints(save)
    assert {name: after.get(name) for name in killed_checkpoints} == killed_checkpoints
    assert sorted(after) == [f"iter_{i:07d}" for i in range(SAVE_INTERVAL, ITERS + 1, SAVE_INTERVAL)]
    kept = [line for line in killed_log if (_iteration_of(line) or ITERS + 1) <= resume_at]  # torn last line: out
    assert len(kept) == resume_at and (save / "metrics.jsonl").read_text().startswith("".join(kept))

    # once more, finished: a no-op that rewrites nothing
    log = (save / "metrics.jsonl").read_bytes()
    run_to_the_end(base, save)
    assert complete_checkpoints(save) == after and (save / "metrics.jsonl").read_bytes() == log
