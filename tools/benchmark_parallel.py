"""Per-iteration training time of each parallel mode on this machine, measured in one run.

    python tools/benchmark_parallel.py --iters 12 --out runs/benchmark_parallel

Every mode trains the same job (examples/pretrain_apex_dit.py, the built-in dataset, the same
global batch) for --iters iterations under torchrun with as many processes as it needs; the
per-iteration time is the median over the iterations after the first --warmup ones (from
metrics.jsonl, logged every iteration); with --repeats R every mode runs R times (the modes in
turn, so a burst of other load hits them alike) and the smallest median is kept. Every process runs --threads intra-op threads (default
1: OpenMP threads that outnumber the free cores spin and wreck the timings on a shared
machine). Prints a markdown table (and writes it to `<out>/benchmark.md`).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "examples" / "pretrain_apex_dit.py"

# name -> (processes, extra flags)
MODES = {
    "1 process": (1, []),
    "1 process + two-phase APEX step": (1, ["--apex-schedule", "two-phase"]),
    "1 process + recompute full": (1, ["--recompute-granularity", "full"]),
    "1 process + recompute selective": (1, ["--recompute-granularity", "selective"]),
    "TP=2": (2, ["--tensor-model-parallel-size", "2"]),
    "DP=2": (2, []),
    "DP=2 + distributed optimizer": (2, ["--use-distributed-optimizer"]),
    "PP=2": (2, ["--pipeline-model-parallel-size", "2"]),
    "TP=2 x PP=2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", default="runs/benchmark_parallel", help="working folder (runs are written there)")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the median")
    p.add_argument("--model", default="qwen-image-tiny")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--variants", default="released,paper", help="APEX variants, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--data-path", default=None, help="default: the built-in dataset")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode; the fastest median is reported")
    a = p.parse_args(argv)
    if a.iters <= a.warmup:
        raise SystemExit(f"--iters ({a.iters}) must exceed --warmup ({a.warmup})")
    unknown = [m for m in a.modes.split(",") if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; known: {list(MODES)}")
    return a


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(a, mode: str, variant: str, out: Path) -> float:
    nproc, extra = MODES[mode]
    save = out / f"{variant}-{mode.replace(' ', '_').replace('+', '').replace('=', '')}"
    shutil.rmtree(save, ignore_errors=True)
    args = ["--model", a.model, "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size",
            str(a.global_batch_size), "--train-iters", str(a.iters), "--log-interval", "1", "--no-progress",
            "--apex-variant", variant, "--save", str(save), *extra]
    if a.data_path:
        args += ["--data-path", a.data_path]
    # the run's final checkpoint save is not measured: metrics.jsonl times the iterations only
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(ENTRY), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} ({variant}) failed:\n{proc.stderr[-3000:]}")
    with open(save / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    times = [a.global_batch_size / r["samples_per_sec"] for r in records if r["iteration"] > a.warmup]
    return statistics.median(times)


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = a.variants.split(",")
    modes = a.modes.split(",")
    started = time.strftime("%Y-%m-%d %H:%M")
    results = {mode: [float("inf")] * len(variants) for mode in modes}
    for repeat in range(a.repeats):
        for mode in modes:
            times = [run_mode(a, mode, v, out) for v in variants]
            results[mode] = [min(old, new) for old, new in zip(results[mode], times)]
            print(f"[{repeat + 1}/{a.repeats}] {mode}: " + ", ".join(f"{v} {t * 1000:.0f} ms"
                                                                  for v, t in zip(variants, times)), flush=True)
    base = results[modes[0]]
    lines = [f"Measured {started}, {os.cpu_count()} CPU cores, {a.threads} thread(s) per process, model {a.model}, "
             f"global batch {a.global_batch_size} (micro-batch {a.micro_batch_size}), median of iterations "
             f"{a.warmup + 1}-{a.iters}, best of {a.repeats} run(s) per mode.", "",
             "| mode | processes | " + " | ".join(f"{v}: ms / iteration (x {modes[0]})" for v in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for mode in modes:
        cells = [f"{t * 1000:.0f} ({t / b:.2f}x)" for t, b in zip(results[mode], base)]
        lines.append(f"| {mode} | {MODES[mode][0]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "benchmark.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
