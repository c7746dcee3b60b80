"""Launch a script under torchrun for multi-process tests (gloo on CPU, nccl with CUDA)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

# Collectives give up after this many seconds (megatron_apex.parallel.init_distributed caps its
# timeout with it), so a rank stuck on a dead peer fails the test instead of hanging it.
DIST_TIMEOUT_S = 45
OUTPUT_TAIL = 6000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _tail(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= OUTPUT_TAIL else "...\n" + text[-OUTPUT_TAIL:]


def run_torchrun(script_path, nproc: int, args=(), timeout: float = 180, env: dict | None = None, *,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc-per-node nproc script args...`` on a free port.

    Returns the CompletedProcess (text stdout/stderr). With ``check`` (the default) a non-zero
    exit or a timeout raises AssertionError carrying the tail of stdout and stderr; the whole
    process group is killed on timeout. ``env`` entries override the inherited environment.
    With fewer GPUs than processes (nccl needs one each) the ranks run on the CPU with gloo.
    """
    script_path = Path(script_path)
    if not script_path.is_file():
        raise FileNotFoundError(f"torchrun script not found: {script_path}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0",
           str(script_path), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "MEGATRON_APEX_DIST_TIMEOUT_S": str(DIST_TIMEOUT_S)}
    if _cuda_device_count() < nproc:
        full_env["CUDA_VISIBLE_DEVICES"] = ""
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{script_path.name} (nproc={nproc}) timed out after {timeout}s\n"
                             f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script_path.name} (nproc={nproc}) exited with {proc.returncode}\n"
                             f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    return result


def write_json_atomic(path, payload) -> None:
    """For worker scripts: write their results where the test reads them, never half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
