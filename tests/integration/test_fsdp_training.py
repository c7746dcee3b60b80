"""--fsdp (torch FSDP2 over the data-parallel ranks, gloo on the CPU) against plain data
parallelism and one process: the same per-iteration losses and grad norms (FM, and released
APEX with the frozen teacher and an EMA, both sharded); checkpoints written under FSDP that
resume under FSDP and load in one process, and the other way round, continuing with the
uninterrupted run's numbers and holding the same tensors (weights, EMA, teacher, Adam state);
combinations FSDP does not run with refused at start.

As test_parallel_training.py: every run fine-tunes from one iteration-0 checkpoint of the
single-process launch, and each launch runs all its jobs in one set of processes."""

import importlib.util
import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from dist_utils import run_torchrun
from tiny_shards import write_tiny_shards
from test_parallel_training import ENTRY, ITERS, LONG, REL, REPO, Runs, _trained
from test_parallel_training import assert_same_numbers as parallel_same_numbers

WORKER = Path(__file__).parent / "workers" / "fsdp_worker.py"

BASE = ["--model", "qwen-image-tiny-test", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--log-interval", "1", "--no-progress", "--seed", "1234", "--lr", "1e-3", "--ema-decay", "0.9"]
FSDP = ["--fsdp"]
FM = ["--objective", "fm"]
ACCUMULATE = ["--global-batch-size", "16"]  # 2 micro-batches per rank at DP=2, 4 in one process
CONTEXT_DIM = 24  # qwen-image-tiny-test's joint_attention_dim


class FsdpRuns(Runs):
    def __init__(self, root):  # noqa: super().__init__ would write the 384-wide data set
        self.root = root
        self.data = root / "data"
        write_tiny_shards(self.data, CONTEXT_DIM)
        self.init = root / "init"

    def job(self, name, iters=ITERS, extra=(), probe=None, action="train", init=True, checkpoint=False):
        variant = [] if "--objective" in extra else ["--apex-variant", "released"]
        argv = [*BASE, "--data-path", str(self.data), *variant, "--train-iters", str(iters),
                "--save", str(self.root / name), *extra]
        if init:
            argv += ["--load", str(self.init), "--finetune"]
        return dict(name=name, argv=argv, probe=probe, action=action, checkpoint=checkpoint)

    def launch(self, nproc, jobs, tag, timeout=600):
        plan, done = self.root / f"plan_{tag}.json", self.root / f"done_{tag}.json"
        plan.write_text(json.dumps({"done": str(done), "jobs": jobs}))
        print(run_torchrun(WORKER, nproc, [plan], timeout=timeout).stdout)  # per-job times
        assert json.loads(done.read_text())["jobs"] == [j["name"] for j in jobs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process: the common start, the references (FM, 5 iterations, global batch 8 and 16;
    released APEX with teacher and EMA, 10 iterations with checkpoints at 5 and 10).
    2 processes: plain DP and FSDP of both; what an FSDP rank holds after one step; FSDP FM with
    full recompute and with 2 micro-batches per rank; --bf16 under DP and FSDP, and FSDP 3 + 2;
    FSDP 10 straight and 5 + 5 (resumed under FSDP); FSDP resumed from the 1-process checkpoint.
    1 process again: plain and FSDP (1 rank) resumed from the FSDP checkpoint. (Runs compared
    with each other have the same --train-iters: the LR decays over them.)"""
    runs = FsdpRuns(tmp_path_factory.mktemp("fsdp_training"))
    runs.launch(1, [runs.job("init", action="save_init", init=False, checkpoint=True),
                    runs.job("ref_fm", extra=FM), runs.job("ref_fm_accumulated", extra=[*FM, *ACCUMULATE]),
                    runs.job("ref_long", iters=LONG, extra=["--save-interval", "5"], checkpoint=True)], "single")
    split = ["--exit-interval", "5"]
    bf16 = ["--bf16"]
    runs.launch(2, [runs.job("dp2_fm", extra=FM), runs.job("fsdp_fm", extra=[*FSDP, *FM]),
                    runs.job("fsdp_fm_recompute", extra=[*FSDP, *FM, "--recompute-granularity", "full"]),
                    runs.job("fsdp_fm_accumulated", extra=[*FSDP, *FM, *ACCUMULATE]),
                    runs.job("dp2_bf16", extra=bf16), runs.job("fsdp_bf16", extra=[*FSDP, *bf16]),
                    runs.job("fsdp_bf16_split", extra=[*FSDP, *bf16, "--exit-interval", "3"], checkpoint=True),
                    runs.job("fsdp_bf16_resumed", init=False,
                             extra=[*FSDP, *bf16, "--load", str(runs.root / "fsdp_bf16_split")]),
                    runs.job("dp2_long", iters=LONG), runs.job("fsdp_bytes", extra=FSDP, action="state_bytes"),
                    runs.job("fsdp_long", iters=LONG, extra=FSDP, checkpoint=True),
                    runs.job("fsdp_split", iters=LONG, extra=[*FSDP, *split], checkpoint=True),
                    runs.job("fsdp_resumed", iters=LONG, init=False, checkpoint=True,
                             extra=[*FSDP, "--load", str(runs.root / "fsdp_split")]),
                    runs.job("fsdp_from_dp1", iters=LONG, init=False, checkpoint=True,
                             extra=[*FSDP, "--load", runs.checkpoint("ref_long", 5)])], "two")
    runs.launch(1, [runs.job("dp1_from_fsdp", iters=LONG, init=False, checkpoint=True,
                             extra=["--load", str(runs.root / "fsdp_split")]),
                    runs.job("fsdp1_from_fsdp", iters=LONG, init=False, checkpoint=True,
                             extra=[*FSDP, "--load", str(runs.root / "fsdp_split")])], "back")
    return runs


def assert_same_numbers(got, ref, iterations=range(1, ITERS + 1), rel=REL):
    """test_parallel_training's comparison; flow-matching runs log loss, grad_norm and l_fm."""
    parallel_same_numbers(got, ref, iterations, rel, min_keys=3)


def checkpoint_tensors(ckpt):
    """Every tensor of a checkpoint, whole, read in this one process (torch DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(ckpt)
    entries = {k: v for k, v in reader.read_metadata().state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata)}
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in entries.items()}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def _kind(key):
    """model / ema / teacher, or the optimizer state's name (exp_avg, exp_avg_sq)."""
    parts = key.split(".")
    return parts[2] if parts[0] == "optimizer" else parts[0]


def assert_same_tensors(got, ref, rel=1e-5):
    """The same keys, shapes and dtypes; values equal up to ``rel`` of the largest value of
    their kind (Adam turns float rounding in a near-zero gradient into a visible relative
    change of a near-zero weight; a misplaced shard moves values by their own size)."""
    assert sorted(got) == sorted(ref)
    kinds = {_kind(k) for k in ref}
    assert {"model", "ema", "teacher", "exp_avg", "exp_avg_sq"} <= kinds, kinds
    scale = {kind: max(ref[k].abs().max().item() for k in ref if _kind(k) == kind) for kind in kinds}
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
        assert (got[k] - ref[k]).abs().max().item() <= rel * scale[_kind(k)], k


# ---- same numbers as plain data parallelism and as one process ------------------------------

@pytest.mark.parametrize("objective", ["fm", "released"])
def test_fsdp_matches_data_parallel_and_one_process(runs, objective):
    names = ("fsdp_fm", "dp2_fm", "ref_fm") if objective == "fm" else ("fsdp_long", "dp2_long", "ref_long")
    fsdp, dp2, one = map(runs.metrics, names)
    iterations = range(1, max(fsdp) + 1)
    assert _trained(dp2)
    assert_same_numbers(fsdp, dp2, iterations)
    assert_same_numbers(fsdp, one, iterations)


def test_fsdp_with_activation_recompute_gives_the_same_numbers(runs):
    assert_same_numbers(runs.metrics("fsdp_fm_recompute"), runs.metrics("ref_fm"))


def test_fsdp_accumulates_micro_batches_like_one_process(runs):
    # each micro-batch's gradients are reduce-scattered and added to the shards
    reference = runs.metrics("ref_fm_accumulated")
    assert [r["loss"] for r in reference.values()] != [r["loss"] for r in runs.metrics("ref_fm").values()]
    assert_same_numbers(runs.metrics("fsdp_fm_accumulated"), reference)


def test_fsdp_bf16_matches_data_parallel_and_resumes(runs):
    # FSDP keeps a bf16 model's gradient shards in bf16 (reduced in fp32), where megatron's DDP
    # accumulates fp32 main grads: equal up to bf16 rounding of the gradients (eps 2**-8)
    fsdp, dp2 = runs.metrics("fsdp_bf16"), runs.metrics("dp2_bf16")
    assert _trained(dp2)
    assert_same_numbers(fsdp, dp2, rel=5e-3)
    resumed = {**runs.metrics("fsdp_bf16_split"), **runs.metrics("fsdp_bf16_resumed")}
    assert sorted(runs.metrics("fsdp_bf16_resumed")) == [4, 5]
    for it in fsdp:  # the fp32 master shards and Adam state come back exactly
        assert (resumed[it]["loss"], resumed[it]["grad_norm"]) == (fsdp[it]["loss"], fsdp[it]["grad_norm"]), it


def test_fsdp_keeps_the_teacher_and_ema_like_one_process(runs):
    # the 10-iteration FSDP run ends with the weights, EMA, teacher and Adam state of one process
    fsdp, one = checkpoint_tensors(runs.checkpoint("fsdp_long", LONG)), checkpoint_tensors(
        runs.checkpoint("ref_long", LONG))
    assert_same_tensors(fsdp, one)
    assert (fsdp["ema.proj_out.weight"] - fsdp["model.proj_out.weight"]).abs().max() > 1e-4  # EMA lags


# ---- checkpoints that reshard --------------------------------------------------------------

def test_fsdp_resume_continues_the_uninterrupted_run(runs):
    straight = runs.metrics("fsdp_long")
    assert sorted(straight) == list(range(1, LONG + 1)) and _trained(straight)
    assert sorted(runs.metrics("fsdp_split")) == list(range(1, ITERS + 1))
    resumed = runs.metrics("fsdp_resumed")
    assert sorted(resumed) == list(range(ITERS + 1, LONG + 1))
    for it in resumed:
        for key in ("loss", "l_base", "l_fake", "l_dm", "grad_norm"):
            assert resumed[it][key] == straight[it][key], (it, key)  # bitwise: same ops, same order


@pytest.mark.parametrize("name", ["dp1_from_fsdp", "fsdp1_from_fsdp", "fsdp_from_dp1"])
def test_fsdp_checkpoints_reshard_to_and_from_one_process(runs, name):
    reference = runs.metrics("ref_long")
    assert_same_numbers(runs.metrics(name), reference, range(ITERS + 1, LONG + 1))
    assert_same_tensors(checkpoint_tensors(runs.checkpoint(name, LONG)),
                        checkpoint_tensors(runs.checkpoint("ref_long", LONG)))


def test_fsdp_checkpoint_holds_whole_tensors_like_one_process(runs):
    # the FSDP checkpoint at 5 has the keys, shapes and values of the 1-process one
    assert_same_tensors(checkpoint_tensors(runs.checkpoint("fsdp_split", ITERS)),
                        checkpoint_tensors(runs.checkpoint("ref_long", ITERS)))


# ---- the memory planner counts what an FSDP rank holds ----------------------------------------

def test_planner_counts_the_shards_an_fsdp_rank_holds(runs):
    from megatron_apex.families import count_parameters, get_model_config

    ranks = [json.loads((runs.root / "fsdp_bytes" / f"state_bytes_rank{r}.json").read_text()) for r in (0, 1)]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--json", "--fsdp", "--dp", "2",
                           "--model", "qwen-image-tiny-test", "--params-dtype", "float32", "--ema",
                           "--latent-grid", "4x4", "--text-len", "4"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (stage,) = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("weights", "grads", "optimizer", "copies"):
        assert stage[kind] == ranks[0][kind], (kind, stage[kind], ranks[0][kind])  # rank 0 holds the larger rows
    # the two ranks' shards make the whole fp32 model: weights, grads, Adam's 2 moments, teacher + EMA
    whole = 4 * count_parameters(get_model_config("qwen-image-tiny-test"))
    for kind, copies in (("weights", 1), ("grads", 1), ("optimizer", 2), ("copies", 2)):
        assert ranks[0][kind] + ranks[1][kind] == copies * whole, kind
    parts = ("weights", "grads", "optimizer", "copies", "activations", "gathered")
    assert stage["gathered"] > 0 and stage["total"] == sum(stage[k] for k in parts)


# ---- what FSDP does not run with, refused at start -----------------------------------------

BAD = {
    "tp": (["--tensor-model-parallel-size", "2"], "--fsdp cannot run with --tensor-model-parallel-size 2"),
    "pp": (["--pipeline-model-parallel-size", "2"], "--fsdp cannot run with --pipeline-model-parallel-size 2"),
    "distopt": (["--use-distributed-optimizer"], "--fsdp cannot run with --use-distributed-optimizer"),
    "lora": (["--lora-rank", "4"], "--fsdp cannot run with --lora-rank 4"),
    "two-phase": (["--apex-schedule", "two-phase"], "--fsdp cannot run with --apex-schedule two-phase"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_fsdp_combinations_refused_at_start_naming_both_flags(tmp_path, capsys, name):
    spec = importlib.util.spec_from_file_location("pretrain_apex_dit", ENTRY)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    args, needle = BAD[name]
    save = tmp_path / "run"
    code = entry.main([*BASE, "--train-iters", "1", "--save", str(save), *FSDP, *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert needle in errors[0], errors[0]
    assert not (save / "latest").exists()
