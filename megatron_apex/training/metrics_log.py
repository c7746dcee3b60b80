"""Per-iteration metrics: `<save>/metrics.jsonl` (one JSON object per logged iteration) and
TensorBoard scalars, written by the last pipeline stage's first data-parallel rank only."""

import json
import os
import time
from typing import Dict, Optional

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str] = None, enabled: bool = True):
        self.enabled = enabled and save_dir is not None
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        # Append: a resumed run continues the same file; entries past the resumed iteration
        # are dropped first so the file never shows two different values for one iteration.
        self.path = os.path.join(save_dir, "metrics.jsonl")
        tb_dir = tensorboard_dir or os.path.join(save_dir, "tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tb_dir)
        except ImportError:  # tensorboard is a base dependency; stay usable without it
            self._tb = None

    def truncate_after(self, iteration: int) -> None:
        """Drop entries logged after `iteration` (they belong to a run that was interrupted
        before its next checkpoint and will be recomputed)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line.rstrip("\n") + "\n" for line in f
                    if _iteration_of(line) is not None and _iteration_of(line) <= iteration]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            self._jsonl = open(self.path, "a")
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressReport:
    """What the loop reports after each iteration: a record every --log-interval iterations, at
    the last one and at every skipped update, with the throughput since the previous record; and
    the progress bar."""

    def __init__(self, logger: MetricsLogger, global_batch_size: int, log_interval: int, total: int,
                 start_iteration: int, bar: bool):
        self.logger, self.global_batch_size, self.log_interval, self.total = logger, global_batch_size, log_interval, total
        self.bar = tqdm(total=total, initial=start_iteration, desc="train", dynamic_ncols=True) if bar else None
        self.window_start, self.window_iters = time.time(), 0

    def iteration_done(self, iteration: int, metrics: Dict, consumed_samples: int, objective: str) -> None:
        self.window_iters += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
        if iteration % self.log_interval == 0 or iteration == self.total or metrics["update_skipped"]:
            elapsed = max(time.time() - self.window_start, 1e-9)
            self.logger.log({"iteration": iteration, **metrics,
                             "samples_per_sec": self.window_iters * self.global_batch_size / elapsed,
                             "consumed_samples": consumed_samples, "objective": objective})
            self.window_start, self.window_iters = time.time(), 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()


def _iteration_of(line: str):
    """The record's iteration; None for a blank line or one torn by a crash mid-write."""
    try:
        return json.loads(line)["iteration"] if line.strip() else None
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str):
    """All records of a metrics.jsonl, in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
