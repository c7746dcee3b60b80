"""Per-iteration training time of each parallel mode on this machine, measured in one run.

    python tools/benchmark_parallel.py --iters 12 --out runs/benchmark_parallel

Every mode trains the same job (examples/pretrain_apex_dit.py, the built-in dataset, the same
global batch) for --iters iterations under torchrun with as many processes as it needs; the
per-iteration time is the median over the iterations after the first --warmup ones (from
metrics.jsonl, logged every iteration); with --repeats R every mode runs R times (the modes in
turn, so a burst of other load hits them alike) and the smallest median is kept. Every process runs --threads intra-op threads (default
1: OpenMP threads that outnumber the free cores spin and wreck the timings on a shared
machine). Prints a markdown table (and writes it to `<out>/benchmark.md`).

With --memory every mode also runs the job once more for its step's memory: each rank takes one
training step (so Adam's state exists), then one whose peak resident memory above its start is
read from Linux's high-water mark (/proc/self/status VmHWM, reset through /proc/self/clear_refs:
activations, transient and communication buffers, whoever frees them), then one counting the
bytes autograd saves for the backward (the activations sequence parallelism divides; every
storage once, summed over the step's micro-batches); the largest rank of each is reported.
(Not torch's profiler: under gloo some buffers are freed by its worker threads, which the
profiler's memory events miss, so its running total drifts up.) It also reports the state a rank
holds between steps: the bytes of its weights, gradients, optimizer state, frozen teacher and
EMA (a sharded tensor's own shard: what --fsdp divides), the largest rank's.

    python tools/benchmark_parallel.py --model qwen-image-tiny-p2 --modes "TP=2,TP=2 + SP" --memory
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
    # needs image tokens divisible by 2: qwen-image-tiny's 7 x 7 patch grid is refused, use --model qwen-image-tiny-p2
    "TP=2 + SP": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "DP=2": (2, []),
    "DP=2 + distributed optimizer": (2, ["--use-distributed-optimizer"]),
    "DP=2 + FSDP": (2, ["--fsdp"]),
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
    p.add_argument("--variants", default="released,paper",
                   help="APEX variants, comma-separated; 'fm' trains flow matching (--objective fm)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--data-path", default=None, help="default: the built-in dataset")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode; the fastest median is reported")
    p.add_argument("--memory", action="store_true", help="also measure each mode's peak step memory per rank")
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


def _job_args(a, mode: str, variant: str, save: Path) -> list:
    args = ["--model", a.model, "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size",
            str(a.global_batch_size), "--train-iters", str(a.iters), "--log-interval", "1", "--no-progress",
            *(["--objective", "fm"] if variant == "fm" else ["--apex-variant", variant]), "--save", str(save),
            *MODES[mode][1]]
    return args + (["--data-path", a.data_path] if a.data_path else [])


def _torchrun(a, mode: str, variant: str, program: list, env: dict = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={MODES[mode][0]}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *map(str, program)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} ({variant}) failed:\n{proc.stderr[-3000:]}")


def _save_dir(out: Path, mode: str, variant: str) -> Path:
    save = out / f"{variant}-{mode.replace(' ', '_').replace('+', '').replace('=', '')}"
    shutil.rmtree(save, ignore_errors=True)
    return save


def run_mode(a, mode: str, variant: str, out: Path) -> float:
    save = _save_dir(out, mode, variant)
    # the run's final checkpoint save is not measured: metrics.jsonl times the iterations only
    _torchrun(a, mode, variant, [ENTRY, *_job_args(a, mode, variant, save)])
    with open(save / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    times = [a.global_batch_size / r["samples_per_sec"] for r in records if r["iteration"] > a.warmup]
    return statistics.median(times)


def measure_memory(a, mode: str, variant: str, out: Path) -> tuple:
    """(peak resident memory, saved activations, ...) of a training step of ``mode``, bytes, the largest
    rank's each; see the module docstring."""
    save = _save_dir(out, mode, variant)
    save.mkdir(parents=True)
    # glibc serves every allocation of 64 KiB or more from its own mapping and unmaps it when freed,
    # so the resident size follows the live tensors instead of keeping freed ones cached
    _torchrun(a, mode, variant, [Path(__file__).resolve(), MEMORY_PROBE, save, *_job_args(a, mode, variant, save)],
              env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    ranks = [json.loads(p.read_text()) for p in save.glob("memory_rank*.json")]
    return tuple(max(r[k] for r in ranks) for k in ("peak_bytes", "saved_bytes", "state_bytes"))


MEMORY_PROBE = "--rank-memory-probe"  # how the script runs as the rank program of measure_memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_peak_bytes(trainer) -> int:
    """Peak resident memory of this process during one training step, above its start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError as err:
        raise SystemExit(f"--memory reads Linux's per-process memory high-water mark: {err}") from None
    start = _status_kib("VmRSS")
    trainer.train_step()
    return (_status_kib("VmHWM") - start) * 1024


def step_saved_bytes(trainer) -> int:
    """Bytes autograd saves for the backward during one training step (each storage once)."""
    import torch

    saved = {}

    def pack(x):
        base = x if x._base is None else x._base
        saved[id(base)] = base.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        trainer.train_step()
    return sum(saved.values())


def held_state_bytes(trainer) -> int:
    """Bytes of the weights, gradients, optimizer state, teacher and EMA this rank holds (of a
    sharded tensor, its own shard; a tensor shared by several holders, once)."""
    import torch

    from megatron_apex.parallel.fsdp import local_tensor

    tensors = [*trainer.model.parameters(), *(p.grad for p in trainer.model.parameters() if p.grad is not None),
               *(getattr(p, "main_grad", None) for p in trainer.model.parameters())]
    for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        tensors += [v for state in part.optimizer.state.values() for v in state.values()]
        tensors += [p for group in getattr(part, "shard_fp32_from_float16_groups", None)
                    or getattr(part, "fp32_from_float16_groups", []) for p in group]
    for copy in (trainer.ema, trainer.teacher):
        tensors += list(copy.parameters()) if copy is not None else []
    storages = {}
    for t in tensors:
        if torch.is_tensor(t) and t.dim() > 0:
            local = local_tensor(t)
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def rank_memory_probe(save: str, flags: list) -> None:
    import torch.distributed as dist

    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    trainer = Trainer(parse_args(flags))
    trainer.train_step()  # Adam's state and every lazily built buffer exist before the measured step
    peak = step_peak_bytes(trainer)
    saved = step_saved_bytes(trainer)
    path = Path(save) / f"memory_rank{dist.get_rank()}.json"
    path.with_suffix(".tmp").write_text(json.dumps({"peak_bytes": peak, "saved_bytes": saved,
                                                    "state_bytes": held_state_bytes(trainer)}))
    os.replace(path.with_suffix(".tmp"), path)
    from megatron_apex.parallel import destroy_distributed

    destroy_distributed()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [MEMORY_PROBE]:
        return rank_memory_probe(argv[1], argv[2:])
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = a.variants.split(",")
    modes = a.modes.split(",")
    started = time.strftime("%Y-%m-%d %H:%M")
    results = {mode: [float("inf")] * len(variants) for mode in modes}
    memory = {mode: [measure_memory(a, mode, v, out) for v in variants] for mode in modes} if a.memory else {}
    for repeat in range(a.repeats):
        for mode in modes:
            times = [run_mode(a, mode, v, out) for v in variants]
            results[mode] = [min(old, new) for old, new in zip(results[mode], times)]
            print(f"[{repeat + 1}/{a.repeats}] {mode}: " + ", ".join(f"{v} {t * 1000:.0f} ms"
                                                                  for v, t in zip(variants, times)), flush=True)
    base = results[modes[0]]
    columns = [f"{v}: ms / iteration (x {modes[0]})" for v in variants]
    if memory:
        columns += [f"{v}: {what} MiB per rank (x {modes[0]})"
                    for what in ("step peak", "saved activations", "held state") for v in variants]
    lines = [f"Measured {started}, {os.cpu_count()} CPU cores, {a.threads} thread(s) per process, model {a.model}, "
             f"global batch {a.global_batch_size} (micro-batch {a.micro_batch_size}), median of iterations "
             f"{a.warmup + 1}-{a.iters}, best of {a.repeats} run(s) per mode.", "",
             "| mode | processes | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for mode in modes:
        cells = [f"{t * 1000:.0f} ({t / b:.2f}x)" for t, b in zip(results[mode], base)]
        if memory:
            cells += [f"{m[k] / 2 ** 20:.0f} ({m[k] / b[k]:.2f}x)" for k in (0, 1, 2)
                      for m, b in zip(memory[mode], memory[modes[0]])]
        lines.append(f"| {mode} | {MODES[mode][0]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "benchmark.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
