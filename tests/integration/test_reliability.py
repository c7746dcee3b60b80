"""Crash safety of the command line: SIGKILL at random moments (a checkpoint save included),
SIGTERM / a wall-time limit (checkpoint, exit 0), and a stop signal that reaches only one rank.
The reference everywhere is one uninterrupted run; on the CPU a resumed run must reproduce its
per-iteration losses bit for bit."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_run import REPO, ENTRY, TINY, child_env, metrics, start, train
from dist_utils import free_port

ITERS = 10
# --keep-last 2 prunes as it goes, so every restart also checks that pruning never removes
# the checkpoint a restart needs.
SAVING = ["--save-interval", "2", "--keep-last", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save = tmp_path_factory.mktemp("reference")
    train(["--train-iters", ITERS, "--save", save])
    return {r["iteration"]: r for r in metrics(save)}


def _last_iteration(save: Path) -> int:
    try:
        return max((r["iteration"] for r in metrics(save)), default=0)
    except (FileNotFoundError, ValueError):  # not there yet, or a line being written
        return 0


def _saving(save: Path) -> bool:
    return save.is_dir() and any(p.name.startswith(".tmp_iter_") and not p.name.endswith(".deleting")
                                 for p in save.iterdir())


def _wait(proc, condition, what: str, timeout: float = 300) -> bool:
    """Poll until `condition()`; False when the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def _resume_args(save: Path) -> list:
    # As examples/pretrain_apex_dit.sh: --load of the run's own --save, which the trainer resumes,
    # or starts while it holds nothing. Adding --load only once `latest` exists would miss a kill
    # between publishing the first checkpoint and writing `latest`; the fresh start over that
    # checkpoint is then refused (no run writes over a complete checkpoint).
    return ["--load", save]


def _assert_same_losses(save: Path, reference: dict) -> None:
    got = {r["iteration"]: r for r in metrics(save)}
    assert sorted(got) == sorted(reference)
    for it, ref in reference.items():
        for key in ("loss", "grad_norm"):
            assert got[it][key] == ref[key], (it, key, got[it][key], ref[key])  # bitwise on CPU


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_losses(tmp_path, reference):
    save = tmp_path / "killed"
    rng = random.Random(20261128)
    kills = []  # (iteration reached, killed while a save was in flight)
    # kill 0 and 2 at random moments, kill 1 while a checkpoint is being written
    for attempt in range(3):
        proc = start(["--train-iters", ITERS, "--save", save, *SAVING, *_resume_args(save)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reached = _last_iteration(save)
        if attempt == 1:
            alive = _wait(proc, lambda: _saving(save) and _last_iteration(save) > reached, "a checkpoint save")
        else:
            target = reached + rng.randint(1, 3)
            alive = _wait(proc, lambda: _last_iteration(save) >= target, f"iteration {target}")
            time.sleep(rng.uniform(0.0, 0.3))
        during_save = _saving(save)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert alive and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        kills.append((_last_iteration(save), during_save))
    assert any(during_save for _, during_save in kills), kills

    resumed = train(["--train-iters", ITERS, "--save", save, *SAVING, *_resume_args(save)])
    assert "resumed from" in resumed.stdout
    _assert_same_losses(save, reference)
    assert sorted(p.name for p in save.iterdir() if p.name.startswith(("iter_", ".tmp"))) == \
        ["iter_0000008", "iter_0000010"]
    assert (save / "latest").read_text().strip() == str(ITERS)


def test_sigterm_saves_exits_zero_and_the_resume_continues_exactly(tmp_path, reference):
    save = tmp_path / "preempted"
    proc = start(["--train-iters", ITERS, "--save", save], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait(proc, lambda: _last_iteration(save) >= 3, "iteration 3")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    stopped = int((save / "latest").read_text())
    assert 3 <= stopped < ITERS and "received SIGTERM" in out
    assert (save / f"iter_{stopped:07d}" / "train_state.json").is_file()

    train(["--train-iters", ITERS, "--save", save, "--load", save])
    _assert_same_losses(save, reference)


def test_exit_duration_saves_and_exits_zero(tmp_path, reference):
    save = tmp_path / "timed"
    proc = train(["--train-iters", ITERS, "--save", save, "--exit-duration-in-mins", "0.0001"])
    assert "--exit-duration-in-mins 0.0001 reached" in proc.stdout
    assert int((save / "latest").read_text()) == 1  # the first boundary is already past the limit
    train(["--train-iters", ITERS, "--save", save, "--load", save])
    _assert_same_losses(save, reference)


def _children(pid: int) -> list:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    save = tmp_path / "dp2"
    cmd = [os.sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--max-restarts", "0", str(ENTRY), *TINY,
           "--train-iters", "40", "--save", str(save)]
    proc = subprocess.Popen(cmd, env={**child_env(), "MEGATRON_APEX_DIST_TIMEOUT_S": "60"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert _wait(proc, lambda: _last_iteration(save) >= 2, "iteration 2")
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only; rank 0 must learn it through the all-reduce
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    stopped = int((save / "latest").read_text())
    assert 2 <= stopped < 40 and "another rank received a stop signal" in out
    assert max(r["iteration"] for r in metrics(save)) == stopped
