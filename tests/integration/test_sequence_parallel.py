"""--sequence-parallel (gloo on the CPU): the same numbers as tensor parallelism without it and
as one process, and configurations it cannot run with refused at start.

1. Model level (workers/sequence_parallel_worker.py, 2 processes): the same forward and, after
   megatron's finalize_model_grads, every gradient as TP=2 without SP, on an odd caption
   length (padded under SP); before finalize, exactly the replicated weights applied to the
   sequence shards (row-parallel biases, the output projection) differ, so a missing TP
   all-reduce of them would show.
2. Training loop (workers/train_worker.py): 3 iterations of flow matching and of released
   APEX on qwen-image-tiny-test, TP=2 + SP against TP=2 and TP=1 (loss, every objective term,
   grad norm), with full recompute too, and TP=2 x PP=2 + SP (4 processes).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_torchrun
from test_parallel_training import assert_same_numbers as parallel_same_numbers
from tiny_shards import write_tiny_shards

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).parent / "workers"
ENTRY = REPO / "examples" / "pretrain_apex_dit.py"
ITERS = 3
REL = 1e-5
TEXT_LEN = 5  # odd: the sequence-parallel runs pad the caption to 6
BASE = ["--model", "qwen-image-tiny-test", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--log-interval", "1", "--no-progress", "--seed", "1234", "--lr", "1e-3", "--train-iters", str(ITERS)]
TP2, PP2, SP = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"], ["--sequence-parallel"]
OBJECTIVES = {"fm": ["--objective", "fm"], "released": ["--apex-variant", "released"]}


# ---- 1. model level ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_level(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp_model") / "sp"
    run_torchrun(WORKERS / "sequence_parallel_worker.py", 2, [out], timeout=300)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def _max_diff(a, b):
    a, b = torch.tensor(a), torch.tensor(b)
    return (a - b).abs().max().item(), b.abs().max().item()


def test_activations_are_split_along_the_sequence(model_level):
    for rank in model_level:
        assert rank["tp"]["image_tokens_per_block"] == [16, 16]
        assert rank["sp"]["image_tokens_per_block"] == [8, 8]


def test_forward_matches_tensor_parallel_without_it(model_level):
    for rank in model_level:
        for key in ("out", "no_mask_out"):
            diff, scale = _max_diff(rank["sp"][key], rank["tp"][key])
            assert scale > 1 and diff <= 1e-6 * scale, (key, diff, scale)


def test_every_gradient_matches_after_finalize(model_level):
    for rank in model_level:
        tp, sp = rank["tp"]["after"], rank["sp"]["after"]
        assert sorted(sp) == sorted(tp)
        still = set()
        for name in tp:
            diff, scale = _max_diff(sp[name], tp[name])
            assert diff <= 1e-5 * max(1.0, scale), (name, diff, scale)
            if scale == 0:
                still.add(name)
        # only the last block's text-stream tail gets no gradient (the model drops its output)
        assert still and all(n.startswith("layers.1.") and ("txt_" in n or "added_" in n) for n in still), still
    replicated = model_level[0]["sp"]["replicated"]
    for name in replicated:  # and the replicated ones agree over the TP ranks
        diff, scale = _max_diff(model_level[0]["sp"]["after"][name], model_level[1]["sp"]["after"][name])
        assert diff <= 1e-6 * max(1.0, scale), (name, diff)


def test_only_the_marked_weights_need_the_tp_all_reduce(model_level):
    """Before finalize_model_grads, a replicated weight applied to the sequence shards holds only
    its rank's share of the gradient: those (and only those) must carry ``sequence_parallel``,
    the attribute finalize_model_grads all-reduces by. Leaving one out shows up here."""
    expected_marked = {f"layers.{i}.{piece}.bias" for i in range(2)
                       for piece in ("attention.linear_proj", "attention.linear_added_proj", "img_mlp.linear_fc2",
                                     "txt_mlp.linear_fc2")} | {"proj_out.weight", "proj_out.bias"}
    for rank in model_level:
        sp, tp = rank["sp"], rank["tp"]
        assert set(sp["marked"]) == expected_marked and tp["marked"] == []
        partial = set()
        for name in sp["replicated"]:
            diff, scale = _max_diff(sp["before"][name], tp["before"][name])
            if diff > 1e-4 * max(1.0, scale):
                partial.add(name)
        # the last block's text tail gets a zero gradient, so its biases cannot differ
        assert partial == {n for n in expected_marked if not n.startswith("layers.1.txt_mlp")
                           and n != "layers.1.attention.linear_added_proj.bias"}, partial


def test_image_tokens_not_divisible_by_tp_are_refused_in_one_line(model_level):
    message = model_level[0]["odd_grid_error"]
    assert message is not None and "\n" not in message
    for needle in ("--sequence-parallel", "--tensor-model-parallel-size (2)", "15 image tokens", "3x5"):
        assert needle in message, message


# ---- 2. training loop --------------------------------------------------------------------------

class Runs:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        write_tiny_shards(self.data, context_dim=24, max_text_len=TEXT_LEN)

    def job(self, name, objective="released", extra=(), action="train", init=True):
        argv = [*BASE, "--data-path", str(self.data), "--save", str(self.root / name), *OBJECTIVES[objective], *extra]
        if init:
            argv += ["--load", str(self.root / "init"), "--finetune"]
        return dict(name=name, argv=argv, action=action, checkpoint=action == "save_init")

    def launch(self, nproc, jobs, tag, timeout=600):
        plan, done = self.root / f"plan_{tag}.json", self.root / f"done_{tag}.json"
        plan.write_text(json.dumps({"done": str(done), "jobs": jobs}))
        print(run_torchrun(WORKERS / "train_worker.py", nproc, [plan], timeout=timeout).stdout)
        assert json.loads(done.read_text())["jobs"] == [j["name"] for j in jobs]

    def metrics(self, name):
        with open(self.root / name / "metrics.jsonl") as f:
            return {r["iteration"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run fine-tunes from one iteration-0 checkpoint (a PP=2 model is seeded per stage,
    so it would not start from the weights of the others)."""
    runs = Runs(tmp_path_factory.mktemp("sp_training"))
    runs.launch(1, [runs.job("init", action="save_init", init=False),
                    *(runs.job(f"tp1_{o}", o) for o in OBJECTIVES)], "single")
    jobs = [job for o in OBJECTIVES for job in (runs.job(f"tp2_{o}", o, TP2), runs.job(f"tp2sp_{o}", o, TP2 + SP))]
    jobs.append(runs.job("tp2sp_recompute_released", "released", TP2 + SP + ["--recompute-granularity", "full"]))
    runs.launch(2, jobs, "two")
    runs.launch(4, [runs.job(f"tp2pp2sp_{o}", o, TP2 + PP2 + SP) for o in OBJECTIVES], "four")
    return runs


def assert_same_numbers(got, ref, rel=REL):
    """test_parallel_training's comparison over this file's iterations, which both runs logged."""
    assert sorted(ref) == list(range(1, ITERS + 1))
    parallel_same_numbers(got, ref, range(1, ITERS + 1), rel, min_keys=3)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_training_matches_tp2_without_it_and_one_process(runs, objective):
    ref = runs.metrics(f"tp1_{objective}")
    losses = [r["loss"] for r in ref.values()]
    assert len(set(losses)) == len(losses) and all(r["grad_norm"] > 0 for r in ref.values())  # it trains
    assert_same_numbers(runs.metrics(f"tp2sp_{objective}"), runs.metrics(f"tp2_{objective}"))
    assert_same_numbers(runs.metrics(f"tp2sp_{objective}"), ref)


def test_training_with_full_recompute(runs):
    assert_same_numbers(runs.metrics("tp2sp_recompute_released"), runs.metrics("tp1_released"))


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_tensor_x_pipeline_parallel(runs, objective):
    assert_same_numbers(runs.metrics(f"tp2pp2sp_{objective}"), runs.metrics(f"tp1_{objective}"))


# ---- 3. what it cannot run with fails at start -------------------------------------------------

BAD = {
    "without TP": (SP, ["--sequence-parallel", "--tensor-model-parallel-size > 1", "--tensor-model-parallel-size 1"]),
    "Sana": (["--model", "sana-tiny-test", *TP2, *SP], ["--sequence-parallel", "Sana"]),
    "LoRA": ([*TP2, *SP, "--lora-rank", "4"], ["--sequence-parallel", "--lora-rank"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_combinations_fail_at_start_naming_the_flags(tmp_path, capsys, name):
    spec = importlib.util.spec_from_file_location("pretrain_apex_dit", ENTRY)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    args, needles = BAD[name]
    code = entry.main([*BASE, "--save", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
