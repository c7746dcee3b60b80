#!/usr/bin/env python
"""Small-scale reproduction of the APEX paper's claims as one resumable command.

    python tools/benchmark_quality.py --quick          # 7 runs, ~19 min on the idle 2-core machine
    python tools/benchmark_quality.py                  # full: 60 runs, ~7.2 h on the idle 2-core machine
    python tools/benchmark_quality.py --smoke --only fm,released-ft   # seconds per run (tests)
    python tools/benchmark_quality.py --list [--quick] # the plan, its launcher flags and time estimate
    python tools/benchmark_quality.py --report-only [--quick]

qwen-image-tiny on the built-in Fashion-MNIST with MiniLM prompts, every run through the normal
launcher (torchrun over 2 CPU processes of one thread each, examples/pretrain_apex_dit.py). An FM
teacher is trained once and sampled at NFE 1, 2, 4, 8, 50 (Euler); APEX runs fine-tune from it
(`--load TEACHER --finetune`, docs/apex_recipe.md row B) or train from scratch and are sampled at
NFE 1, 2, 4 (any-step flow map); a curve row trains once and is evaluated at several training
lengths (the mode's `curve`: does one-step quality keep improving with compute?). Every sample
set is scored by megatron_apex.eval.metrics.evaluate_images (accuracy, Frechet distance,
diversity; the class-mean and real-image scores as references).

Outputs under --out (default runs/benchmark_quality[_quick|_smoke]):
  runs/NAME/          the run's checkpoints (launcher --save), metrics.jsonl, launcher.log
  samples/NAME/       nfe{N}_s{SEED}.png (one row per class prompt) and .npz (as tools/sample.py)
  samples/NAME/itersN/  a curve row's samples of its length-N checkpoint
  runs/NAME/curve_evals.json  a curve row's finished lengths, so an interrupted evaluation resumes
  results/NAME.json   the run's evaluation, written atomically once the run is done (a curve row:
                      `evals` of its last length and `curve`, [{iters, evals}] per length)
  report.md, fd_vs_nfe.png, ablations.png, curve.png   (megatron_apex/eval/report.py, from results/*.json)
Rerunning the same command skips runs with a result, evaluates trained runs and resumes unfinished
training from its newest checkpoint (launcher --load). A failed run is recorded as failed (the
report names the error), the others go on; the next rerun retries it.

Expected runtimes are estimates from idle-machine speeds (FM 4.9 it/s, released APEX 1.45 it/s,
paper APEX 2.1 it/s at DP=2, docs/benchmarks.md) plus ~25 s launcher start per run and sampling
at one thread; `--list` prints them per run. Another job on the 2 cores slows everything down
several-fold (sampling with 2 threads under load most of all: hence --eval-threads 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without the package installed
    sys.path.insert(0, str(REPO))

from megatron_apex.cli import OneLineErrorParser  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
FM = ("--objective", "fm")
# The release's APEX (docs/apex_recipe.md): c_fake = -c at the projected site, frozen FM teacher
# for the real velocity, DM weight 1 held off 80 iterations, DM gradient clamped to [-1, 1]: the
# default job's APEX.
RELEASED = ("--objective", "apex", "--apex-variant", "released", "--teacher", "frozen",
            "--apex-option", "w_dm=1.0", "--apex-option", "dm_warmup_steps=80")
# From scratch a frozen copy of the random init would be the DM's real velocity: the release's
# full-tuning setting (the online model) instead.
RELEASED_SCRATCH = RELEASED + ("--teacher", "online")
# The authors' released combination (docs/apex_method.md, the `release` preset); its CFG-enhanced
# target needs a teacher that knows the empty prompt, so its rows fine-tune fm-drop.
PRESET = ("--objective", "apex", "--apex-preset", "release")
PAPER = ("--objective", "apex", "--apex-variant", "paper")  # lam 0.5, 1:1, w = (1-t)/t, detach
INPUT_SITE = ("--shift-site", "input")
INPUT_SHIFT_CANDIDATE = (-0.5, 1.0)
FM_NFES = (1, 2, 4, 8, 50)
APEX_NFES = (1, 2, 4)


def opt(*fields: str) -> Tuple[str, ...]:
    return tuple(x for f in fields for x in ("--apex-option", f))


def shift(a: float, b: float) -> Tuple[str, ...]:
    return ("--shift-a", str(a), "--shift-b", str(b))


@dataclass(frozen=True)
class Run:
    """One row of the plan. base: the row it fine-tunes from (--load BASE --finetune), None =
    from scratch. budget: which of the mode's iteration counts it trains ("fm" | "ft" |
    "scratch"). seeds: "one" (the mode's first seed), "train" (a training run per mode seed,
    each sampled with its own sampling seed) or "sample" (one training run, sampled once per
    mode seed). quick: part of --quick. curve: train the mode's longest curve length once and
    evaluate the checkpoint at every curve length (Mode.curve). cells: the report cells it fills
    (megatron_apex/eval/report.py)."""

    name: str
    base: Optional[str]
    budget: str
    flags: Tuple[str, ...]
    seeds: str = "one"
    quick: bool = False
    nfes: Tuple[int, ...] = APEX_NFES
    method: str = "flowmap"
    curve: bool = False
    cells: Dict = field(default_factory=dict, hash=False)


def input_site_cell(a: float, b: float) -> Run:
    """A Table 7 cell at the input site. The candidate shift (the best cell of one seed, and the
    paper's best) runs every seed and joins the headline; docs/apex_recipe.md says why the
    launcher still keeps the release's shift."""
    cells: Dict = {"table7_input": (a, b)}
    candidate = (a, b) == INPUT_SHIFT_CANDIDATE
    if candidate:
        cells["headline"] = "APEX released, input-site shift (-0.5, 1), fine-tuned"
    return Run(f"t7in-a{a:g}-b{b:g}", "fm", "ft", RELEASED + shift(a, b) + INPUT_SITE,
               seeds="train" if candidate else "one", cells=cells)


RUNS: Tuple[Run, ...] = (
    # ---- headline: FM teacher vs APEX, both variants, fine-tuned and from scratch
    Run("fm", None, "fm", FM, seeds="sample", quick=True, nfes=FM_NFES, method="euler",
        cells={"headline": "FM teacher (Euler)", "claim": "teacher"}),
    Run("released-ft", "fm", "ft", RELEASED, seeds="train", quick=True,
        cells={"headline": "APEX released, fine-tuned", "claim": "apex", "table7": (-1.0, 0.0),
               "site": "projected (default)", "options": "default: clamp 1, w_dm 1, frozen teacher"}),
    Run("paper-ft", "fm", "ft", PAPER, seeds="train", quick=True,
        cells={"headline": "APEX paper, fine-tuned", "table6": "1:1", "fake_grad": "detach (default)",
               "weighting": "paper (default)"}),
    # from scratch: one seed each (a scratch run costs two fine-tunes; the seed spread is measured
    # on the fine-tuned rows above)
    Run("released-scratch", None, "scratch", RELEASED_SCRATCH, cells={"headline": "APEX released, from scratch"}),
    Run("paper-scratch", None, "scratch", PAPER, cells={"headline": "APEX paper, from scratch"}),
    # ---- released variant: its options (docs/apex_method.md, points 4-5)
    Run("released-noclamp", "fm", "ft", RELEASED + opt("dm_clamp=None"), cells={"options": "no DM clamp"}),
    Run("released-normalize", "fm", "ft", RELEASED + opt("dm_normalize=true", "dm_clamp=None", "w_dm=0.5"),
        cells={"options": "normalised DM gradient, w_dm 0.5"}),
    Run("released-nodm", "fm", "ft", RELEASED + opt("w_dm=0"), cells={"options": "no DM term (w_dm 0)"}),
    Run("released-online", "fm", "ft", RELEASED + ("--teacher", "online"), cells={"options": "online teacher"}),
    Run("released-consistency", "fm", "ft", RELEASED + opt("w_consistency=1.0"),
        cells={"options": "+ consistency term (w 1)"}),
    Run("released-split", "fm", "ft", RELEASED + opt("batch_split=0.5"), cells={"options": "batch split 0.5"}),
    # the CFG-enhanced target queries the teacher on the empty prompt: a teacher trained with caption dropout
    Run("fm-drop", None, "fm", FM + ("--caption-dropout", "0.1"), seeds="sample", nfes=FM_NFES, method="euler",
        cells={"headline": "FM teacher, caption dropout 0.1 (Euler)"}),
    Run("released-cfg", "fm-drop", "ft", RELEASED + opt("cfg_scale=0.8"),
        cells={"options": "CFG-enhanced target r 0.8 (from fm-drop)"}),
    # ---- the release's training pieces one at a time, then together (docs/apex_method.md, the
    # `release` preset); the preset's CFG-enhanced target needs a teacher that knows the empty
    # prompt, so the preset rows fine-tune fm-drop
    Run("released-time-flag", "fm", "ft", RELEASED + opt("fake_time_flag=true"),
        cells={"options": "fake queries at (-t, -t)"}),
    Run("released-huber", "fm", "ft", RELEASED + opt("loss=pseudo_huber"), cells={"options": "pseudo-Huber loss"}),
    Run("released-tan", "fm", "ft", RELEASED + opt("tan_weight=true"), cells={"options": "tan weight on base rows"}),
    Run("released-any-step", "fm", "ft", RELEASED + opt("any_step=true"),
        cells={"options": "any-step rows on RCGM targets"}),
    Run("release-preset", "fm-drop", "ft", PRESET, seeds="train",
        cells={"headline": "APEX release preset (the default job's), fine-tuned from fm-drop",
               "options": "release preset (from fm-drop)"}),
    Run("release-preset-velocity", "fm-drop", "ft", PRESET + opt("any_step=false"), seeds="train",
        cells={"headline": "APEX release preset without any-step rows, fine-tuned from fm-drop",
               "options": "release preset without any-step rows (from fm-drop)"}),
    Run("release-preset-online", "fm-drop", "ft", PRESET + ("--teacher", "online"),
        cells={"options": "release preset, online teacher (from fm-drop)"}),
    Run("release-preset-velocity-online", "fm-drop", "ft", PRESET + opt("any_step=false") + ("--teacher", "online"),
        cells={"options": "release preset without any-step rows, online teacher (from fm-drop)"}),
    # the release's few-step sampler (jump to tt = 0, re-noise on its grids) on the preset's model (the
    # release-preset-s1234 training, repeated: the same seed gives the same weights)
    Run("release-preset-release-sampler", "fm-drop", "ft", PRESET, nfes=(2, 4), method="release",
        cells={"options": "release preset, sampled with the release's few-step sampler (from fm-drop)"}),
    # the best one-step rows combined: the preset with the paper's best shift cell (Table 7, input site)
    Run("release-preset-input-shift", "fm-drop", "ft", PRESET + shift(*INPUT_SHIFT_CANDIDATE) + INPUT_SITE,
        seeds="train", cells={"options": "release preset + input-site shift (-0.5, 1) (from fm-drop)"}),
    # does one-step quality keep improving with compute? One run, evaluated at every curve length
    Run("release-preset-curve", "fm-drop", "ft", PRESET, curve=True, cells={"curve": "release preset (from fm-drop)"}),
    Run("paper-input-best", "fm", "ft", PAPER + shift(*INPUT_SHIFT_CANDIDATE) + INPUT_SITE,
        cells={"options": "paper variant, input-site shift (-0.5, 1)"}),
    # ---- paper Table 6: lambda_p : lambda_e (paper variant; 1:1 is paper-ft)
    Run("t6-1-0", "fm", "ft", PAPER + ("--lambda-p", "1", "--lambda-e", "0"), quick=True, cells={"table6": "1:0"}),
    Run("t6-0-1", "fm", "ft", PAPER + ("--lambda-p", "0", "--lambda-e", "1"), quick=True, cells={"table6": "0:1"}),
    Run("t6-1-0.5", "fm", "ft", PAPER + ("--lambda-p", "1", "--lambda-e", "0.5"), cells={"table6": "1:0.5"}),
    Run("t6-1-2", "fm", "ft", PAPER + ("--lambda-p", "1", "--lambda-e", "2"), cells={"table6": "1:2"}),
    # ---- paper Table 7: c_fake = a*c + b (released variant; a=-1, b=0 is released-ft)
    # At the projected site b is invisible to qwen-image (every block LayerNorms the text stream:
    # tests/unit/test_family_models.py::test_projected_scalar_shift_offset_b_is_invisible_to_the_model),
    # so there the grid is its b=0 column, plus two cells that show b changes nothing; the whole
    # grid runs at the input site, before the text RMSNorm, where b does reach the model.
    Run("t7-a-1-b1", "fm", "ft", RELEASED + shift(-1, 1), cells={"table7": (-1.0, 1.0)}),
    Run("t7-a-0.5-b0", "fm", "ft", RELEASED + shift(-0.5, 0), cells={"table7": (-0.5, 0.0)}),
    Run("t7-a-0.5-b1", "fm", "ft", RELEASED + shift(-0.5, 1), quick=True, cells={"table7": (-0.5, 1.0)}),
    Run("t7-a0.5-b0", "fm", "ft", RELEASED + shift(0.5, 0), quick=True, cells={"table7": (0.5, 0.0)}),
    *(input_site_cell(a, b) for a in (-1.0, -0.5, 0.5) for b in (0.0, 0.1, 1.0, 10.0) if (a, b) != (-1.0, 0.0)),
    # ---- shift site, fake_grad, weighting
    Run("released-site-input", "fm", "ft", RELEASED + INPUT_SITE, cells={"site": "input", "table7_input": (-1.0, 0.0)}),
    Run("paper-through", "fm", "ft", PAPER + ("--fake-grad", "through"), cells={"fake_grad": "through"}),
    Run("paper-w-endpoint", "fm", "ft", PAPER + ("--weighting", "endpoint"), cells={"weighting": "endpoint"}),
    Run("paper-w-velocity", "fm", "ft", PAPER + ("--weighting", "velocity"), cells={"weighting": "velocity"}),
)


@dataclass(frozen=True)
class Mode:
    name: str
    iters: Dict[str, int] = field(hash=False)  # per budget
    seeds: Tuple[int, ...]
    num_per_prompt: int  # sampled images per class prompt (10 prompts)
    quick_rows_only: bool
    out: str
    curve: Tuple[int, ...]  # a curve row's training lengths (fine-tuning iterations), ascending


MODES = {
    "full": Mode("full", {"fm": 1500, "ft": 500, "scratch": 1000}, (1234, 1235, 1236), 100, False,
                 "runs/benchmark_quality", curve=(250, 500, 1000, 2000)),
    "quick": Mode("quick", {"fm": 600, "ft": 200, "scratch": 400}, (1234,), 30, True, "runs/benchmark_quality_quick",
                  curve=(100, 200, 400)),
    "smoke": Mode("smoke", {"fm": 4, "ft": 3, "scratch": 3}, (1234,), 2, True, "runs/benchmark_quality_smoke",
                  curve=(1, 2, 3)),
}

# Launcher flags every run shares (the default job's, examples/pretrain_apex_dit.sh).
COMMON = ("--model", "qwen-image-tiny", "--micro-batch-size", "32", "--global-batch-size", "64",
          "--clip-grad", "1.0", "--ema-decay", "0.99", "--log-interval", "10", "--no-progress")
GLOBAL_BATCH = 64
KNOWN_CELLS = {"headline", "claim", "table6", "table7", "table7_input", "options", "site", "fake_grad", "weighting",
               "curve"}


def schedule_flags(budget: str, iters: int) -> Tuple[str, ...]:
    """FM and from-scratch runs: the default job's cosine 1e-3 -> 5e-4 with warmup; fine-tuning:
    a constant 5e-4 (docs/apex_recipe.md row B)."""
    if budget == "ft":
        return ("--lr", "5e-4", "--lr-decay-style", "constant")
    return ("--lr", "1e-3", "--min-lr", "5e-4", "--lr-warmup-iters", str(min(100, iters // 10)),
            "--lr-decay-iters", str(iters), "--lr-decay-style", "cosine")


# ---------------------------------------------------------------------------------------------
# Plan expansion
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One training run + its evaluation."""

    name: str
    run: Run
    index: int  # the row's position in the plan
    seed: int
    sample_seeds: Tuple[int, ...]
    iters: int
    base_job: Optional[str]
    curve: Tuple[int, ...] = ()  # the training lengths evaluated (a curve row); iters is the last


def validate_runs(runs: Sequence[Run]) -> None:
    seen: Dict[str, Run] = {}
    for r in runs:
        if r.name in seen:
            raise ValueError(f"plan: run name {r.name!r} appears twice")
        if r.base is not None:
            if r.base not in seen:
                raise ValueError(f"plan: run {r.name!r} fine-tunes from {r.base!r}, which is not an earlier row")
            if seen[r.base].seeds == "train":
                raise ValueError(f"plan: run {r.name!r} fine-tunes from {r.base!r}, which has one run per seed")
        if r.budget not in ("fm", "ft", "scratch"):
            raise ValueError(f"plan: run {r.name!r} budget {r.budget!r}: use fm, ft or scratch")
        if r.seeds not in ("one", "train", "sample"):
            raise ValueError(f"plan: run {r.name!r} seeds {r.seeds!r}: use one, train or sample")
        if r.curve and r.budget != "ft":
            # only the constant fine-tuning LR makes a run's first N iterations an N-iteration run
            raise ValueError(f"plan: run {r.name!r} curve=True needs budget 'ft' (constant LR), got {r.budget!r}")
        unknown = set(r.cells) - KNOWN_CELLS
        if unknown:
            raise ValueError(f"plan: run {r.name!r} cells {sorted(unknown)}: known {sorted(KNOWN_CELLS)}")
        seen[r.name] = r


def expand(run: Run, index: int, mode: Mode) -> List[Job]:
    curve = tuple(sorted(set(mode.curve))) if run.curve else ()
    iters = curve[-1] if curve else mode.iters[run.budget]
    if run.seeds == "train" and len(mode.seeds) > 1:
        return [Job(f"{run.name}-s{seed}", run, index, seed, (i,), iters, run.base, curve)
                for i, seed in enumerate(mode.seeds)]
    samples = tuple(range(len(mode.seeds))) if run.seeds == "sample" else (0,)
    return [Job(run.name, run, index, mode.seeds[0], samples, iters, run.base, curve)]


def build_plan(mode: Mode, runs: Sequence[Run] = RUNS) -> List[Job]:
    """The mode's jobs in plan order; a fine-tune's base_job names its base's (single) job."""
    validate_runs(runs)
    rows = [(i, r) for i, r in enumerate(runs) if r.quick or not mode.quick_rows_only]
    names = {r.name for _, r in rows}
    for _, r in rows:
        if r.base is not None and r.base not in names:
            raise ValueError(f"plan: run {r.name!r} is in mode {mode.name} but its base {r.base!r} is not")
    return [job for i, r in rows for job in expand(r, i, mode)]


def select(jobs: Sequence[Job], only: Optional[str]) -> List[Job]:
    """--only NAME[,NAME]: plan rows or single jobs, plus the bases they fine-tune from."""
    if not only:
        return list(jobs)
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    known = {j.name for j in jobs} | {j.run.name for j in jobs}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--only {unknown[0]}: not in this mode's plan; known: {', '.join(sorted(known))}")
    keep = {j.name for j in jobs if j.name in wanted or j.run.name in wanted}
    for j in reversed(jobs):  # bases come earlier in the plan
        if j.name in keep and j.base_job:
            keep.add(j.base_job)
    return [j for j in jobs if j.name in keep]


# ---------------------------------------------------------------------------------------------
# Where a job stands (resumability)
# ---------------------------------------------------------------------------------------------

def run_dir(out: Path, job_name: str) -> Path:
    return out / "runs" / job_name


def result_path(out: Path, job_name: str) -> Path:
    return out / "results" / f"{job_name}.json"


def trained_iters(path: Path) -> int:
    """Iteration of the newest complete checkpoint under a save directory (0: none)."""
    from megatron_apex.checkpoint import complete_checkpoints

    found = complete_checkpoints(str(path))
    return found[-1] if found else 0


def finished_result(out: Path, job: Job) -> bool:
    path = result_path(out, job.name)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except json.JSONDecodeError:
        return False


def job_action(out: Path, job: Job) -> str:
    """skip (result done) | evaluate (trained) | resume (has a checkpoint) | start."""
    if finished_result(out, job):
        return "skip"
    done = trained_iters(run_dir(out, job.name))
    if done >= job.iters:
        return "evaluate"
    return "resume" if done > 0 else "start"


def launcher_args(out: Path, job: Job) -> List[str]:
    """pretrain_apex_dit.py flags: resume from the run's own checkpoint when it has one, else
    fine-tune from the base's."""
    save = run_dir(out, job.name)
    args = [*COMMON, *schedule_flags(job.run.budget, job.iters), *job.run.flags,
            "--seed", str(job.seed), "--train-iters", str(job.iters), "--save", str(save), *save_flags(job)]
    if trained_iters(save) > 0:
        args += ["--load", str(save)]
    elif job.base_job:
        args += ["--load", str(base_checkpoint(out, job)), "--finetune"]
    return args


def save_flags(job: Job) -> List[str]:
    """A normal run keeps only its newest checkpoint. A curve run saves at every multiple of the
    lengths' gcd (the trainer saves when iteration % --save-interval == 0), so each curve length
    gets a checkpoint, and keeps them all (no --keep-last): a checkpoint saved on an interruption
    lands between the multiples, and any finite --keep-last could then prune a curve length."""
    if job.curve:
        return ["--save-interval", str(math.gcd(*job.curve))]
    return ["--save-interval", str(max(1, job.iters // 4)), "--keep-last", "1"]


def base_checkpoint(out: Path, job: Job) -> Path:
    """The base run's newest complete checkpoint (Table 7's runs fine-tune it with their own fixed
    shift, which the trainer allows: a fixed scalar shift holds no weights)."""
    from megatron_apex.checkpoint import resolve_checkpoint

    return Path(resolve_checkpoint(str(run_dir(out, job.base_job))))


# ---------------------------------------------------------------------------------------------
# Time estimates and progress
# ---------------------------------------------------------------------------------------------
ITS_PER_SEC = {"fm": 4.9, "paper": 2.1, "released": 1.45}  # idle 2 cores, DP=2 (docs/benchmarks.md)
LAUNCH_SECONDS = 25.0  # torchrun start, megatron init, checkpoint saves
SECONDS_PER_IMAGE_STEP = 2.2e-3  # one sampler step of one image, one thread
SECONDS_PER_EVAL = 3.0  # evaluate_images on one sample set, plus loading the model


def its_per_sec(run: Run) -> float:
    flags = " ".join(run.flags)
    kind = "fm" if "--objective fm" in flags else "paper" if "variant paper" in flags else "released"
    speed = ITS_PER_SEC[kind]
    if "batch_split" in flags:
        speed *= 1.9  # docs/benchmarks.md: 1.88x FM step instead of 3.69x
    if "w_consistency" in flags:
        speed *= 0.8  # one more forward/backward on the base rows (not measured)
    if ("any_step=true" in flags or "apex-preset release" in flags) and "any_step=false" not in flags:
        speed *= 0.8  # two more no-grad forwards on the base rows (not measured)
    return speed


def estimate_seconds(job: Job, mode: Mode) -> float:
    """job.iters is a curve run's longest length; each curve length is sampled and scored."""
    images = 10 * mode.num_per_prompt * len(job.sample_seeds)
    sampling = images * sum(job.run.nfes) * SECONDS_PER_IMAGE_STEP
    evals = len(job.run.nfes) * len(job.sample_seeds) * SECONDS_PER_EVAL
    return LAUNCH_SECONDS + job.iters / its_per_sec(job.run) + (sampling + evals) * max(1, len(job.curve))


def hms(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """k of n, elapsed, ETA: the remaining estimate scaled by how the finished jobs compared to
    theirs."""

    def __init__(self, jobs: Sequence[Job], mode: Mode, out: Path):
        self.mode, self.start = mode, time.time()
        self.todo = {j.name: estimate_seconds(j, mode) for j in jobs if job_action(out, j) != "skip"}
        self.n, self.k = len(self.todo), 0
        self.spent_estimate = 0.0

    def begin(self, job: Job, what: str) -> None:
        self.k += 1
        elapsed = time.time() - self.start
        scale = elapsed / self.spent_estimate if self.spent_estimate > 60 else 1.0
        remaining = sum(self.todo.values()) * scale
        print(f"[benchmark {self.k}/{self.n} | elapsed {hms(elapsed)} | ETA {hms(remaining)}] {job.name}: {what}",
              flush=True)

    def end(self, job: Job) -> None:
        self.spent_estimate += self.todo.pop(job.name, 0.0)


# ---------------------------------------------------------------------------------------------
# Training through the launcher
# ---------------------------------------------------------------------------------------------

class JobFailed(Exception):
    pass


def launcher_command(args: Sequence[str]) -> List[str]:
    nproc = 2 if (os.cpu_count() or 1) >= 2 else 1
    # --standalone: torchrun picks its own free port (a port chosen here could be taken before
    # the job binds it)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(REPO / "examples" / "pretrain_apex_dit.py"), *args]


def _child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # as the launcher script on CPU: 2 processes x 1 thread
    return env


def _error_line(log: Path) -> str:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines()[-200:] if l.strip()]
    errors = [l for l in lines if "error:" in l.lower() or l.startswith(("ValueError", "RuntimeError"))]
    return (errors or lines or ["no output"])[-1][:400]


def train(out: Path, job: Job) -> None:
    """Run (or resume) the job's training; its wall time accumulates in runs/NAME/benchmark_time.json."""
    save = run_dir(out, job.name)
    save.mkdir(parents=True, exist_ok=True)
    log = save / "launcher.log"
    cmd = launcher_command(launcher_args(out, job))
    for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
        offset = log.stat().st_size if log.is_file() else 0
        rc = _run_logged(cmd, log, save)
        # torchrun's workers bind a port chosen before the bind; another process can take it in
        # between. The run resumes from its last checkpoint, so a relaunch loses nothing.
        if rc == 0 or attempt == PORT_RACE_ATTEMPTS or not _lost_port_race(log, offset):
            break
        print(f"  {job.name}: the rendezvous port was taken by another process; relaunching", flush=True)
    if rc != 0:
        raise JobFailed(f"launcher exit code {rc}: {_error_line(log)} (log: {log})")
    if trained_iters(save) < job.iters:
        raise JobFailed(f"training stopped at iteration {trained_iters(save)} of {job.iters} (log: {log})")


PORT_RACE_ATTEMPTS = 3


def _run_logged(cmd: Sequence[str], log: Path, save: Path) -> int:
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the trainer saves a checkpoint on SIGTERM and exits 0
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            _add_train_seconds(save, time.time() - start)


def _lost_port_race(log: Path, offset: int) -> bool:
    with open(log, "rb") as f:
        f.seek(offset)
        return b"EADDRINUSE" in f.read()


def _add_train_seconds(save: Path, seconds: float) -> None:
    path = save / "benchmark_time.json"
    total = json.loads(path.read_text())["train_seconds"] if path.is_file() else 0.0
    write_json(path, {"train_seconds": total + seconds})


def write_json(path: Path, payload: Dict) -> None:
    from megatron_apex.checkpoint import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), payload)


def training_record(save: Path) -> Dict:
    """Measured speed (median it/s of the logged windows), the last logged losses, train seconds."""
    records = []
    metrics = save / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    speeds = sorted(r["samples_per_sec"] / GLOBAL_BATCH for r in records if r.get("samples_per_sec"))
    timing = save / "benchmark_time.json"
    return {"its_per_sec": speeds[len(speeds) // 2] if speeds else None,
            "last_metrics": records[-1] if records else None,
            "train_seconds": json.loads(timing.read_text())["train_seconds"] if timing.is_file() else None}


# ---------------------------------------------------------------------------------------------
# Sampling and scoring (the same draws as tools/sample.py)
# ---------------------------------------------------------------------------------------------

def _sample_tool():
    spec = importlib.util.spec_from_file_location("_benchmark_sample_tool", Path(__file__).with_name("sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Scorer:
    """Loaded once per invocation: class prompts, their MiniLM encodings, the classifier."""

    def __init__(self, num_per_prompt: int):
        import numpy as np
        import torch

        from megatron_apex.data.builtin import build_builtin_shards
        from megatron_apex.data.shards import read_manifest
        from megatron_apex.data.text_encoder import MiniLMTextEncoder
        from megatron_apex.eval.classifier import load_or_train_classifier

        manifest = read_manifest(build_builtin_shards())
        self.prompts = list(manifest["class_prompts"])
        self.shape = tuple(manifest["image_shape"])
        self.dataset = manifest.get("dataset")
        self.k = num_per_prompt
        context, mask = MiniLMTextEncoder().encode(self.prompts, max_length=int(manifest["max_text_len"]))
        self.context = torch.from_numpy(context).repeat_interleave(self.k, dim=0)
        self.mask = torch.from_numpy(mask).repeat_interleave(self.k, dim=0)
        self.labels = np.repeat(np.arange(len(self.prompts)), self.k)
        self.classifier = load_or_train_classifier(self.dataset, None)
        self.tool = _sample_tool()

    def images(self, model, nfe: int, method: str, seed: int):
        """uint8 (N, H, W, C): tools/sample.py's images for this seed."""
        from megatron_apex.inference.samplers import sample_seeded

        return self.tool.to_uint8(sample_seeded(model, self.context, self.mask, self.shape, nfe, method, seed))

    def save(self, images, prefix: Path, nfe: int) -> None:
        import numpy as np

        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.tool.save_grid(images, len(self.prompts), str(prefix) + ".png")
        tmp = str(prefix) + ".tmp.npz"
        np.savez_compressed(tmp, images=images, prompts=np.array(np.repeat(self.prompts, self.k)), nfe=nfe,
                            labels=self.labels, **({"dataset": self.dataset} if self.dataset else {}))
        os.replace(tmp, str(prefix) + ".npz")

    def score(self, images) -> Dict:
        from megatron_apex.eval.metrics import evaluate_images

        return evaluate_images(images, self.labels, dataset_name=self.dataset, classifier=self.classifier)


def evaluate(out: Path, job: Job, scorer: Scorer, iteration: Optional[int] = None) -> List[Dict]:
    """The run's newest checkpoint, or with `iteration` (a curve length) that one, sampled at the
    row's NFEs and sampling seeds (a curve length's samples under samples/NAME/itersN/)."""
    from megatron_apex.checkpoint import checkpoint_dir
    from megatron_apex.inference.loading import load_model_for_inference

    save = str(run_dir(out, job.name))
    model, _ = load_model_for_inference(save if iteration is None else checkpoint_dir(save, iteration), "auto")
    samples = out / "samples" / job.name / ("" if iteration is None else f"iters{iteration}")
    evals = []
    for sample_seed in job.sample_seeds:
        for nfe in job.run.nfes:
            images = scorer.images(model, nfe, job.run.method, sample_seed)
            prefix = samples / f"nfe{nfe}_s{sample_seed}"
            scorer.save(images, prefix, nfe)
            evals.append({"nfe": nfe, "sample_seed": sample_seed, "method": job.run.method, **scorer.score(images),
                          "grid": str(prefix.relative_to(out)) + ".png"})
    return evals


CURVE_PROGRESS = "curve_evals.json"  # in the run's directory: deleting the run deletes it too


def evaluate_curve(out: Path, job: Job, scorer: Scorer) -> List[Dict]:
    """[{iters, evals}] for every curve length, ascending. Each length's evaluation is written to
    runs/NAME/curve_evals.json as soon as it is done, so an interrupted evaluation resumes with
    the first length not recorded there (for the same NFEs, sampling seeds and checkpoint)."""
    from megatron_apex.checkpoint import checkpoint_dir, complete_checkpoints

    save = run_dir(out, job.name)
    missing = sorted(set(job.curve) - set(complete_checkpoints(str(save))))
    if missing:
        raise JobFailed(f"curve checkpoints {missing} are missing under {save}; delete that directory to retrain")
    stamps = {n: (Path(checkpoint_dir(str(save), n)) / "train_state.json").stat().st_mtime_ns for n in job.curve}
    key = {"nfes": list(job.run.nfes), "sample_seeds": list(job.sample_seeds), "method": job.run.method}
    done = _curve_progress(save / CURVE_PROGRESS, key, stamps)
    for n in job.curve:
        if n not in done:
            done[n] = {"iters": n, "evals": evaluate(out, job, scorer, iteration=n), "checkpoint_mtime_ns": stamps[n]}
            write_json(save / CURVE_PROGRESS, {**key, "curve": [done[k] for k in sorted(done)]})
    return [{"iters": n, "evals": done[n]["evals"]} for n in job.curve]


def _curve_progress(path: Path, key: Dict, stamps: Dict[int, int]) -> Dict[int, Dict]:
    """The recorded lengths still valid: same evaluation settings, checkpoint not rewritten since."""
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if any(recorded.get(k) != v for k, v in key.items()):
        return {}
    return {p["iters"]: p for p in recorded.get("curve", [])
            if p.get("iters") in stamps and p.get("checkpoint_mtime_ns") == stamps[p["iters"]]}


def result_record(job: Job, mode: Mode, status: str, **extra) -> Dict:
    return {"job": job.name, "entry": job.run.name, "plan_index": job.index, "mode": mode.name, "seed": job.seed,
            "base": job.base_job, "iters": job.iters, "flags": list(job.run.flags), "cells": job.run.cells,
            "status": status, **extra}


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def run_job(out: Path, mode: Mode, job: Job, progress: Progress, scorer_box: List) -> None:
    action = job_action(out, job)
    if action == "skip":
        return
    base_ok = job.base_job is None or finished_training(out, job.base_job, mode)
    if not base_ok:
        print(f"[benchmark] {job.name}: skipped, its base {job.base_job} is not trained", flush=True)
        progress.end(job)
        return
    what = {"evaluate": "evaluating", "resume": f"resuming training at iteration {trained_iters(run_dir(out, job.name))}"
            f" of {job.iters}", "start": f"training {job.iters} iterations"
            + (f" (fine-tuning {job.base_job})" if job.base_job else "")}[action]
    progress.begin(job, what)
    try:
        if action != "evaluate":
            train(out, job)
        start = time.time()
        if not scorer_box:
            scorer_box.append(Scorer(mode.num_per_prompt))
        curve = {}
        if job.curve:  # the last length is the run: its evals fill the row's usual cells
            curve = {"curve": evaluate_curve(out, job, scorer_box[0])}
            evals = curve["curve"][-1]["evals"]
        else:
            evals = evaluate(out, job, scorer_box[0])
        record = result_record(job, mode, "ok", evals=evals, **curve, eval_seconds=time.time() - start,
                               **training_record(run_dir(out, job.name)))
        points = curve.get("curve") or [{"iters": job.iters, "evals": evals}]
        nfe = min(job.run.nfes)  # a row need not sample NFE=1 (the few-step sampler's rows)
        print(f"[benchmark] {job.name}: NFE={nfe} FD " + ", ".join(f"{_mean_fd(p['evals'], nfe):.1f}"
              + (f" at {p['iters']} it" if job.curve else "") for p in points), flush=True)
    except JobFailed as err:
        print(f"[benchmark] {job.name}: FAILED: {err}", flush=True)
        record = result_record(job, mode, "failed", error=str(err), **training_record(run_dir(out, job.name)))
    write_json(result_path(out, job.name), record)
    progress.end(job)


def _mean_fd(evals: Sequence[Dict], nfe: int) -> float:
    fds = [e["fd"] for e in evals if e["nfe"] == nfe]
    return sum(fds) / len(fds)


def finished_training(out: Path, job_name: str, mode: Mode) -> bool:
    needed = next((j.iters for j in build_plan(mode) if j.name == job_name), None)
    return needed is not None and trained_iters(run_dir(out, job_name)) >= needed


def mode_of(args) -> Mode:
    return MODES["smoke" if args.smoke else "quick" if args.quick else "full"]


def plan_listing(jobs: Sequence[Job], mode: Mode, out: Path) -> str:
    lines = [f"mode {mode.name}: {len(jobs)} runs, expected {hms(sum(estimate_seconds(j, mode) for j in jobs))} "
             f"on the idle 2-core machine; out {out}"]
    for j in jobs:
        curve = f"  (evaluated at {', '.join(map(str, j.curve))} it)" if j.curve else ""
        lines.append(f"  {j.name:<24} {j.iters:>5} it  seed {j.seed}  ~{hms(estimate_seconds(j, mode))}  "
                     f"{'from ' + j.base_job if j.base_job else 'scratch':<12} {' '.join(j.run.flags)}{curve}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="benchmark_quality.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick plan (< 30 min on 2 idle cores)")
    size.add_argument("--smoke", action="store_true", help="a few iterations per run (tests)")
    p.add_argument("--only", default=None, help="NAME[,NAME]: plan rows or jobs (their bases are added)")
    p.add_argument("--out", default=None, help="default: runs/benchmark_quality[_quick|_smoke] in the repository")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the plots from results/")
    p.add_argument("--list", action="store_true", help="print the plan and its time estimate, run nothing")
    p.add_argument("--eval-threads", type=int, default=1,
                   help="torch threads for sampling and scoring (1: robust when other jobs share the cores)")
    args = p.parse_args(argv)
    if args.eval_threads < 1:
        p.error(f"--eval-threads must be >= 1, got {args.eval_threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = mode_of(args)
    out = Path(args.out).resolve() if args.out else REPO / mode.out
    try:
        jobs = select(build_plan(mode), args.only)
    except ValueError as err:
        print(f"benchmark_quality.py: error: {err}", file=sys.stderr)
        return 2
    expected = sum(estimate_seconds(j, mode) for j in build_plan(mode))
    if args.list:
        print(plan_listing(jobs, mode, out))
        return 0
    from megatron_apex.eval.report import write_report

    if not args.report_only:
        import torch

        torch.set_num_threads(args.eval_threads)
        print(plan_listing(jobs, mode, out), flush=True)
        progress, scorer_box = Progress(jobs, mode, out), []
        try:
            for job in jobs:
                run_job(out, mode, job, progress, scorer_box)
        except KeyboardInterrupt:
            print("[benchmark] interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
            return 130
        print(f"[benchmark] done in {hms(time.time() - progress.start)}", flush=True)
    report = write_report(out, expected_seconds=expected)
    print(f"[benchmark] wrote {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
