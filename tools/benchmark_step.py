"""What one training step costs: APEX vs flow matching, our forward vs diffusers', TP=2 vs TP=1.

    python tools/benchmark_step.py                       # all three sections, qwen-image-tiny
    python tools/benchmark_step.py --sections step,forward --model sana-tiny

All ratios come from one run of this script on one machine:

- step: full training iterations (data, forward, backward, optimizer, EMA) of the launcher's
  Trainer on the same model and the same batch size, flow matching against each APEX variant
  (`paper`; `released` as the launcher runs it; `released` with batch_split=0.5). The objectives
  take turns in rounds of --iters iterations, so a burst of other load hits them alike; each
  time is the median over all rounds. The APEX floor is 3 forwards + 2 backwards of the batch
  (~2.33x an FM step with backward = 2 forwards).
- forward: our model against diffusers' on the same weights and the same input (no grad),
  taking turns call by call (--rounds x --iters calls each); medians of wall-clock time and of
  the process's CPU time (robust to other processes on the machine); also prints the max abs
  difference of the two outputs. diffusers runs as users
  run it (outside this process's CPU adaptation of megatron-core, see
  megatron_apex/parallel/cpu_adaptation.py, which our model needs on a CPU).
- tp: the launcher under torchrun at TP=1 (one process) and TP=2 (two processes), released
  APEX, one thread per process (tools/benchmark_parallel.py does the runs).

Prints a markdown table and writes it to --out (default runs/benchmark_step.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("step", "forward", "tp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ", ".join(SECTIONS))
    p.add_argument("--model", default="qwen-image-tiny", help="registry name")
    p.add_argument("--batch-size", type=int, default=64, help="global batch of a step, batch of a forward")
    p.add_argument("--iters", type=int, default=4, help="iterations (forwards) per round and objective")
    p.add_argument("--rounds", type=int, default=5, help="rounds of turns; times are medians over them")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each objective first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (per process for tp)")
    p.add_argument("--text-len", type=int, default=16, help="text tokens of the forward section's input")
    p.add_argument("--data-path", default=None, help="step/tp sections' data (default: the built-in dataset)")
    p.add_argument("--out", default="runs/benchmark_step.md", help="where the markdown table is written")
    a = p.parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    for flag in ("batch_size", "iters", "rounds", "threads", "text_len"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    a.sections = sections
    return a


def _median_ms(samples):
    return 1000 * statistics.median(samples)


# ------------------------------------------------------------------------------------ step
def step_variants(launcher_config):
    """name -> APEXConfig of the APEX steps compared with flow matching."""
    import dataclasses

    from megatron_apex.objectives.apex import APEXConfig

    # the DM term is on from the first step: its warm-up would make the early steps cheaper
    released = dataclasses.replace(launcher_config, variant="released", dm_warmup_steps=0)
    return {
        "apex paper": APEXConfig(variant="paper", shift_a=launcher_config.shift_a, shift_b=launcher_config.shift_b),
        "apex released (launcher)": released,
        "apex released, batch_split=0.5": dataclasses.replace(released, batch_split=0.5),
    }


def launcher_flags(model: str, batch_size: int, data_path):
    """The launcher's APEX flags (examples/pretrain_apex_dit.sh) on a run that never stops."""
    flags = ["--model", model, "--objective", "apex", "--apex-variant", "released", "--apex-start-iter", "0",
             "--apex-option", "w_dm=1.0", "--micro-batch-size", str(batch_size), "--global-batch-size",
             str(batch_size), "--train-iters", str(10 ** 9), "--no-progress", "--ema-decay", "0.99"]
    return flags + (["--data-path", data_path] if data_path else [])


def bench_step(a):
    from megatron_apex.training.arguments import parse_args as parse_run_args
    from megatron_apex.training.loop import Trainer

    trainer = Trainer(parse_run_args(launcher_flags(a.model, a.batch_size, a.data_path)))
    objectives = {"fm": None, **step_variants(trainer.apex_config)}

    def use(objective):
        config = objectives[objective]
        # the step's apex_active() reads apex_start_iter: FM steps are the iterations before it
        trainer.cfg.objective.apex_start_iter = 0 if config is not None else 10 ** 10
        if config is not None:
            trainer.step.apex_config = config

    def timed(objective, n):
        use(objective)
        out = []
        for _ in range(n):
            start = time.perf_counter()
            trainer.train_step()
            out.append(time.perf_counter() - start)
        return out

    for objective in objectives:
        timed(objective, a.warmup)
    samples = {o: [] for o in objectives}
    for r in range(a.rounds):
        for objective in objectives:
            samples[objective] += timed(objective, a.iters)
        print(f"[step] round {r + 1}/{a.rounds}: " + ", ".join(
            f"{o} {_median_ms(s):.0f} ms" for o, s in samples.items()), flush=True)
    fm = statistics.median(samples["fm"])
    rows = [(o, _median_ms(s), statistics.median(s) / fm) for o, s in samples.items()]
    return rows


# --------------------------------------------------------------------------------- forward
def diffusers_twin(name: str, config, seed: int = 0):
    """(family, ours, diffusers') with the same weights: random, converted from diffusers'."""
    import diffusers

    from megatron_apex.conversion import hf_to_megatron
    from megatron_apex.conversion.random_weights import randomize_weights_
    from megatron_apex.families import family_of_model_name

    family = family_of_model_name(name)
    arch = dict(family.config_to_diffusers(config))
    hf_class = getattr(diffusers, arch.pop("_class_name"))
    with torch.no_grad():
        hf = randomize_weights_(hf_class(**arch), seed).eval()
    ours = family.whole_model(config).eval()
    result = ours.load_state_dict(hf_to_megatron(hf.state_dict(), config, family=family), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"converting diffusers' weights: missing {missing}, unexpected {result.unexpected_keys}")
    return family, ours, hf


@contextlib.contextmanager
def without_torch_function_modes():
    """diffusers as users run it: no torch-function mode (our CPU adaptation) in the way."""
    with torch._C.DisableTorchFunction():
        yield


def bench_forward(a):
    from megatron_apex.conversion.verify import text_mask
    from megatron_apex.families import get_model_config
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)  # no-op when the step section already set megatron up
    config = get_model_config(a.model)
    family, ours, hf = diffusers_twin(a.model, config)
    gen = torch.Generator().manual_seed(0)
    p = config.patch_size
    side = 28 if config.out_channels == 1 else 8 * p  # the built-in data's 28x28 for the tiny models
    side = -(-side // p) * p
    x = torch.randn(a.batch_size, config.out_channels, side, side, generator=gen)
    t = torch.rand(a.batch_size, generator=gen)
    ctx = torch.randn(a.batch_size, a.text_len, config.context_dim, generator=gen)
    mask = text_mask(a.batch_size, a.text_len)

    def run_ours():
        return ours(x, t, ctx, mask)

    def run_hf():
        with without_torch_function_modes():
            return family.reference_forward(hf, config, x, t, ctx, mask)

    runners = {"ours": run_ours, "diffusers": run_hf}
    with torch.no_grad():
        diff = (run_ours() - run_hf()).abs().max().item()
        for run in runners.values():
            for _ in range(a.warmup):
                run()
        wall, cpu = alternating_samples(runners, a.rounds, a.iters, "forward")
    rows = []
    for name in runners:
        rows.append((name, _median_ms(wall[name]), statistics.median(wall[name]) / statistics.median(wall["diffusers"]),
                     _median_ms(cpu[name]), statistics.median(cpu[name]) / statistics.median(cpu["diffusers"])))
    return rows, diff, tuple(x.shape)


def alternating_samples(runners, rounds: int, iters: int, label: str):
    """(wall, cpu): per runner, the wall-clock and the process's CPU seconds of every call.
    The runners take turns call by call, the order reversed every call, so load from other
    processes and the machine's drift hit them alike. CPU time (time.process_time, every
    intra-op thread included) leaves out the time spent waiting for a core, which dominates
    wall time on a loaded machine; it still counts the kernel's page faulting for fresh
    allocations, a real cost of a forward."""
    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for i in range(iters):
            for name in (names if i % 2 == 0 else names[::-1]):
                start_cpu, start = time.process_time(), time.perf_counter()
                runners[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        print(f"[{label}] round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {_median_ms(wall[k]):.1f} ms wall, {_median_ms(cpu[k]):.1f} ms CPU" for k in names), flush=True)
    return wall, cpu


# -------------------------------------------------------------------------------------- tp
def bench_tp(a):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark_parallel

    out = Path(a.out).with_suffix("") / "tp_runs"
    out.mkdir(parents=True, exist_ok=True)
    args = benchmark_parallel.parse_args(
        ["--model", a.model, "--micro-batch-size", str(a.batch_size), "--global-batch-size", str(a.batch_size),
         "--iters", str(a.warmup + a.iters * a.rounds), "--warmup", str(a.warmup), "--threads", str(a.threads)]
        + (["--data-path", a.data_path] if a.data_path else []))
    times = {}
    for mode in ("1 process", "TP=2"):
        times[mode] = benchmark_parallel.run_mode(args, mode, "released", out)
        print(f"[tp] {mode}: {times[mode] * 1000:.0f} ms / iteration", flush=True)
    base = times["1 process"]
    return [(m, 1000 * s, s / base) for m, s in times.items()]


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"Measured {started} on {os.cpu_count()} CPU cores, {a.threads} thread(s) (per process), "
             f"torch {torch.__version__}, model {a.model}, batch {a.batch_size}, medians of {a.rounds} rounds "
             f"x {a.iters} iterations after {a.warmup} warm-up.", ""]
    if "step" in a.sections:
        rows = bench_step(a)
        lines += ["| training step | ms / iteration | x FM step |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.0f} | {ratio:.2f} |" for name, ms, ratio in rows] + [""]
    if "forward" in a.sections:
        rows, diff, shape = bench_forward(a)
        lines += [f"| forward, input {shape}, max abs diff {diff:.1e} | wall ms | x diffusers | CPU ms | x diffusers |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {ms:.1f} | {ratio:.3f} | {cpu_ms:.1f} | {cpu_ratio:.3f} |"
                  for name, ms, ratio, cpu_ms, cpu_ratio in rows] + [""]
    if "tp" in a.sections:
        rows = bench_tp(a)
        lines += ["| tensor parallelism (released APEX) | ms / iteration | x TP=1 |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.0f} | {ratio:.2f} |" for name, ms, ratio in rows] + [""]
    table = "\n".join(lines)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(table)
    os.replace(tmp, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
