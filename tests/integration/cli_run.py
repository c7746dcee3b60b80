"""Run examples/pretrain_apex_dit.py as a user would, for tests of the command line's behaviour
(resume, signals, bad input): a one-layer tiny model on the real built-in data, seconds a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "examples" / "pretrain_apex_dit.py"
TINY_MODEL = ["--model", "qwen-image-tiny", "--num-layers", "1", "--micro-batch-size", "4", "--global-batch-size", "8",
              "--lr-warmup-iters", "0", "--log-interval", "1", "--no-progress", "--ema-decay", "0.9"]
# flow matching for 2 iterations, then the released APEX (a run needs --train-iters 3 or more)
APEX = ["--objective", "apex", "--apex-variant", "released", "--apex-start-iter", "2"]
TINY = TINY_MODEL + APEX

# Rendezvous variables left in this process's environment by in-process tests (their port is
# still bound here) must not reach a child that starts its own single-process group.
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def flags(args) -> list:
    """TINY, then ``args``; a flow-matching run (``--objective fm`` among them) without the APEX
    flags, which the trainer refuses with it (as examples/pretrain_apex_dit.sh leaves its own out)."""
    args = [str(a) for a in args]
    flow_matching = any(a == "--objective" and b == "fm" for a, b in zip(args, args[1:]))
    return [*(TINY_MODEL if flow_matching else TINY), *args]


def command(args) -> list:
    return [sys.executable, str(ENTRY), *flags(args)]


def train(args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args), capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start(args, **popen) -> subprocess.Popen:
    """The trainer as a background process in a session of its own (kill it with os.killpg)."""
    return subprocess.Popen(command(args), env=child_env(), cwd=REPO, start_new_session=True, **popen)


def metrics(save) -> list:
    return [json.loads(line) for line in open(Path(save) / "metrics.jsonl")]
