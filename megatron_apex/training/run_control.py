"""When a run stops early, and whether an update may be applied: preemption signals, the job's
wall-time limit, and non-finite losses or gradients.

Every decision is taken by all ranks together (one tiny all-reduce over the world group), so a
signal that reaches the ranks a moment apart, or a NaN on one pipeline stage, still stops or
skips every rank at the same iteration; otherwise the ranks' collectives would no longer pair up.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _any_rank(flags: List[bool], device: torch.device) -> List[bool]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class SignalWatcher:
    """While active, SIGTERM / SIGINT only ask for a stop at the next iteration boundary (the
    run then saves and exits 0, as a preempted cluster job should). The same signal a second
    time aborts at once (the default behaviour), so Ctrl-C twice still kills a single process;
    a different one is ignored, because torchrun forwards Ctrl-C's SIGINT as a SIGTERM."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[signal.Signals] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received == signum:
            handler = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, handler)
            if callable(handler):
                handler(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> "SignalWatcher":
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread
            for s in self.signals:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class StopPolicy:
    """Why the run should stop now (None = go on): a stop signal on any rank, or more than
    `exit_duration_in_mins` since `start` on any rank."""

    def __init__(self, watcher: SignalWatcher, exit_duration_in_mins: Optional[float], device: torch.device,
                 start: Optional[float] = None):
        self.watcher = watcher
        self.limit_s = None if exit_duration_in_mins is None else 60.0 * exit_duration_in_mins
        self.device = device
        self.start = time.time() if start is None else start

    def reason(self) -> Optional[str]:
        signalled = self.watcher.received is not None
        timed_out = self.limit_s is not None and time.time() - self.start > self.limit_s
        signalled, timed_out = _any_rank([signalled, timed_out], self.device)
        if signalled:
            if self.watcher.received is None:
                return "another rank received a stop signal"
            return f"received {self.watcher.received.name}"
        if timed_out:
            return f"--exit-duration-in-mins {self.limit_s / 60:g} reached"
        return None


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def update_is_finite(loss_terms: Iterable[torch.Tensor], grad_buffers: Iterable[torch.Tensor],
                     device: torch.device) -> bool:
    """True when every rank's loss terms (the last pipeline stage has them) and accumulated
    gradients are finite: the same answer on all ranks."""
    local_bad = not (_finite(loss_terms) and _finite(grad_buffers))
    return not _any_rank([local_bad], device)[0]


class DivergedError(RuntimeError):
    """Too many consecutive non-finite iterations; the last good state is saved."""
