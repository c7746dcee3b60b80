"""The APEX training loop under tensor, data and pipeline parallelism (gloo on the CPU) against
single-process runs: the same per-iteration loss, objective terms and grad norm (5 iterations,
both APEX variants); distributed-optimizer checkpoints that resume bitwise; checkpoints that
reshard between TP=1 and TP=2 (x PP=2); activation recompute; configurations that cannot work
refused at start.

Every run fine-tunes (--finetune) from ONE iteration-0 checkpoint written by the single-process
launch: megatron seeds each pipeline stage differently, so a model built at PP=2 does not start
from the weights a PP=1 model starts from; a common start makes the runs comparable (and loads
that checkpoint resharded to every layout). Each launch runs all its jobs in one set of
processes (workers/train_worker.py)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import run_torchrun
from tiny_shards import write_tiny_shards

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "workers" / "train_worker.py"
ENTRY = REPO / "examples" / "pretrain_apex_dit.py"
VARIANTS = ("released", "paper")
ITERS = 5
LONG = 10  # resume tests: 5 iterations, checkpoint, 5 more
REL = 1e-5
BASE = ["--model", "qwen-image-tiny", "--num-layers", "2", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--log-interval", "1", "--no-progress", "--seed", "1234", "--lr", "1e-3"]
TP2, PP2, DISTOPT = (["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                     ["--use-distributed-optimizer"])
# The release preset (any-step rows with their no-grad RCGM segments, flagged fake queries, pseudo-Huber
# loss, tan weight) without its CFG target, which the two-phase step cannot run
PRESET_TWO_PHASE = ["--apex-preset", "release", "--apex-option", "cfg_scale=0"]


class Runs:
    """Where each job of the launches writes, and how to read it back."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        write_tiny_shards(self.data, context_dim=384)
        self.init = root / "init"

    def job(self, name, variant="released", iters=ITERS, extra=(), probe=None, action="train", init=True,
            checkpoint=False):
        argv = [*BASE, "--data-path", str(self.data), "--apex-variant", variant, "--train-iters", str(iters),
                "--save", str(self.root / name), *extra]
        if init:
            argv += ["--load", str(self.init), "--finetune"]
        return dict(name=name, argv=argv, probe=probe, action=action, checkpoint=checkpoint)

    def launch(self, nproc, jobs, tag, timeout=600):
        plan = self.root / f"plan_{tag}.json"
        done = self.root / f"done_{tag}.json"
        plan.write_text(json.dumps({"done": str(done), "jobs": jobs}))
        proc = run_torchrun(WORKER, nproc, [plan], timeout=timeout)
        print(proc.stdout)  # per-job times
        assert json.loads(done.read_text())["jobs"] == [j["name"] for j in jobs]

    def metrics(self, name):
        with open(self.root / name / "metrics.jsonl") as f:
            return {r["iteration"]: r for r in map(json.loads, f)}

    def probe(self, name):
        return torch.load(self.root / name / "probe.pt")

    def checkpoint(self, name, iteration):
        return str(self.root / name / f"iter_{iteration:07d}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: the common start, the TP1/PP1/DP1 references, the two-phase step at PP=1,
    recompute, and a 10-iteration TP1 run with checkpoints at 5 and 10."""
    runs = Runs(tmp_path_factory.mktemp("parallel_training"))
    jobs = [runs.job("init", action="save_init", init=False, checkpoint=True)]
    for v in VARIANTS:
        jobs += [runs.job(f"ref_{v}", v), runs.job(f"two_phase_{v}", v, extra=["--apex-schedule", "two-phase"])]
    jobs += [runs.job(f"recompute_{g}", extra=["--recompute-granularity", g]) for g in ("full", "selective")]
    jobs += [runs.job("ref_preset", extra=PRESET_TWO_PHASE)]
    jobs += [runs.job("ref_long", iters=LONG, extra=["--save-interval", "5"], checkpoint=True)]
    runs.launch(1, jobs, "single")
    return runs


@pytest.fixture(scope="module")
def two(single):
    """Two processes: TP=2, DP=2, DP=2 + distributed optimizer, PP=2 (both variants); the
    distributed optimizer 10 vs 5 + 5; a TP=2 checkpoint at 5 and a TP=2 run resumed from the
    TP=1 one."""
    runs = single
    jobs = []
    for v in VARIANTS:
        jobs += [runs.job(f"tp2_{v}", v, extra=TP2), runs.job(f"dp2_{v}", v),
                 runs.job(f"distopt_{v}", v, extra=DISTOPT), runs.job(f"pp2_{v}", v, extra=PP2)]
    jobs += [runs.job("pp2_preset", extra=[*PP2, *PRESET_TWO_PHASE])]
    jobs += [runs.job("distopt_long", iters=LONG, extra=DISTOPT),
             runs.job("distopt_split", iters=LONG, extra=[*DISTOPT, "--exit-interval", "5"], checkpoint=True),
             runs.job("distopt_resumed", iters=LONG, init=False,
                      extra=[*DISTOPT, "--load", str(runs.root / "distopt_split")]),
             runs.job("tp2_saved", iters=LONG, extra=[*TP2, "--exit-interval", "5"], probe="end", checkpoint=True),
             runs.job("tp2_from_tp1", iters=LONG, init=False, probe="start",
                      extra=[*TP2, "--load", runs.checkpoint("ref_long", 5)])]
    runs.launch(2, jobs, "two")
    return runs


@pytest.fixture(scope="module")
def four(single):
    """Four processes: TP=2 x PP=2 (both variants), DP=2 x PP=2 with the distributed optimizer,
    a TP=2 x PP=2 checkpoint at 5, and a TP=2 x PP=2 run resumed from the TP=1 one."""
    runs = single
    jobs = [runs.job(f"tp2pp2_{v}", v, extra=[*TP2, *PP2]) for v in VARIANTS]
    jobs += [runs.job("dp2pp2_distopt_released", "released", extra=[*PP2, *DISTOPT])]
    jobs += [runs.job("tp2pp2_saved", iters=LONG, extra=[*TP2, *PP2, "--exit-interval", "5"], probe="end",
                      checkpoint=True),
             runs.job("tp2pp2_from_tp1", iters=LONG, init=False, probe="start",
                      extra=[*TP2, *PP2, "--load", runs.checkpoint("ref_long", 5)])]
    runs.launch(4, jobs, "four")
    return runs


@pytest.fixture(scope="module")
def resharded_back(two, four):
    """One process resuming the TP=2, the TP=2 x PP=2 and the DP=2 distributed-optimizer
    checkpoints; plus the TP=1 model at iteration 5, probed."""
    runs = two
    jobs = [runs.job(f"tp1_from_{name}", iters=LONG, init=False, probe="start",
                     extra=["--load", str(runs.root / f"{name}_saved")]) for name in ("tp2", "tp2pp2")]
    jobs += [dict(runs.job("tp1_at_5", iters=5, init=False, extra=["--load", runs.checkpoint("ref_long", 5)]),
                  action="build", probe="start"),
             runs.job("dp1_from_distopt", iters=LONG, init=False,
                      extra=[*DISTOPT, "--load", str(runs.root / "distopt_split")])]
    runs.launch(1, jobs, "back")
    return runs


def assert_same_numbers(got, ref, iterations=range(1, ITERS + 1), rel=REL, min_keys=4):
    """loss, every l_* term and grad_norm agree per iteration within `rel` (relative); there are
    at least `min_keys` of them (APEX logs loss, grad_norm and 2-3 terms; flow matching 3 in all)."""
    assert sorted(got) == list(iterations) and set(iterations) <= set(ref)
    for it in iterations:
        keys = sorted(k for k in ref[it] if k.startswith("l_") or k in ("loss", "grad_norm"))
        assert keys == sorted(k for k in got[it] if k.startswith("l_") or k in ("loss", "grad_norm"))
        assert {"loss", "grad_norm"} <= set(keys) and len(keys) >= min_keys
        for k in keys:
            assert math.isclose(got[it][k], ref[it][k], rel_tol=rel, abs_tol=1e-12), (it, k, got[it][k], ref[it][k])


def _trained(metrics):
    """The reference itself moved: losses change and gradients are non-zero."""
    losses = [r["loss"] for r in metrics.values()]
    return len(set(losses)) == len(losses) and all(r["grad_norm"] > 0 for r in metrics.values())


# ---- 1. same numbers as one process -------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_parallel_matches_single_process(two, variant):
    ref = two.metrics(f"ref_{variant}")
    assert _trained(ref)
    assert_same_numbers(two.metrics(f"tp2_{variant}"), ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_data_parallel_matches_micro_batches_of_one_process(two, variant):
    # DP=2 x micro-batch 4 vs one process with 2 micro-batches of 4: the same global batch
    assert_same_numbers(two.metrics(f"dp2_{variant}"), two.metrics(f"ref_{variant}"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_distributed_optimizer_matches_single_process(two, variant):
    assert_same_numbers(two.metrics(f"distopt_{variant}"), two.metrics(f"ref_{variant}"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_parallel_matches_single_process(two, variant):
    assert_same_numbers(two.metrics(f"pp2_{variant}"), two.metrics(f"ref_{variant}"))


def test_pipeline_parallel_release_preset_matches_single_process(two):
    """The any-step rows' RCGM segments run as extra no-grad pipeline rounds; with the preset's
    other options the PP=2 numbers still equal the direct step in one process."""
    assert_same_numbers(two.metrics("pp2_preset"), two.metrics("ref_preset"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_x_pipeline_parallel_matches_single_process(four, variant):
    assert_same_numbers(four.metrics(f"tp2pp2_{variant}"), four.metrics(f"ref_{variant}"))


def test_data_x_pipeline_parallel_with_distributed_optimizer_matches_single_process(four):
    assert_same_numbers(four.metrics("dp2pp2_distopt_released"), four.metrics("ref_released"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_phase_step_equals_direct_step_in_one_process(single, variant):
    assert_same_numbers(single.metrics(f"two_phase_{variant}"), single.metrics(f"ref_{variant}"))


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_recompute_gives_the_same_numbers(single, granularity):
    assert_same_numbers(single.metrics(f"recompute_{granularity}"), single.metrics("ref_released"))


# ---- 2. distributed optimizer checkpoints ----------------------------------------------------

def test_distributed_optimizer_resume_is_bitwise(two):
    straight = two.metrics("distopt_long")
    assert sorted(straight) == list(range(1, LONG + 1)) and _trained(straight)
    assert sorted(two.metrics("distopt_split")) == list(range(1, 6))
    resumed = {**two.metrics("distopt_split"), **two.metrics("distopt_resumed")}
    assert sorted(two.metrics("distopt_resumed")) == list(range(6, LONG + 1))
    for it in range(1, LONG + 1):
        for key in ("loss", "l_base", "l_fake", "l_dm", "grad_norm"):
            assert resumed[it][key] == straight[it][key], (it, key)  # bitwise: same ops, same order


def test_distributed_optimizer_checkpoint_reshards_to_one_process(resharded_back):
    # fully_reshardable keeps the optimizer state in model space: DP=2 -> DP=1 continues as before
    assert_same_numbers(resharded_back.metrics("dp1_from_distopt"), resharded_back.metrics("distopt_long"),
                        range(ITERS + 1, LONG + 1))


# ---- 3. checkpoints that reshard --------------------------------------------------------------

@pytest.mark.parametrize("saved", ["tp2", "tp2pp2"])
def test_checkpoint_saved_sharded_loads_at_tp1(resharded_back, saved):
    runs = resharded_back
    saved_output, loaded_output = runs.probe(f"{saved}_saved"), runs.probe(f"tp1_from_{saved}")
    assert saved_output.abs().max() > 1e-3  # the output head has moved off its zero init
    torch.testing.assert_close(loaded_output, saved_output, rtol=0, atol=1e-6)
    # training goes on as the uninterrupted TP=1 run (the same run's first 5 at TP=2 (x PP=2))
    reference = runs.metrics("ref_long")
    assert_same_numbers(runs.metrics(f"{saved}_saved"), reference)
    assert_same_numbers(runs.metrics(f"tp1_from_{saved}"), reference, range(ITERS + 1, LONG + 1))


@pytest.mark.parametrize("layout", ["tp2", "tp2pp2"])
def test_checkpoint_saved_at_tp1_loads_sharded(resharded_back, layout):
    runs = resharded_back
    torch.testing.assert_close(runs.probe(f"{layout}_from_tp1"), runs.probe("tp1_at_5"), rtol=0, atol=1e-6)
    assert_same_numbers(runs.metrics(f"{layout}_from_tp1"), runs.metrics("ref_long"), range(ITERS + 1, LONG + 1))


# ---- 4, 5. what cannot work fails at start ---------------------------------------------------

BAD = {
    "heads": (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3"],
              ["--num-attention-heads (3)", "--tensor-model-parallel-size (2)"]),
    "layers": (["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
               ["--num-layers (3)", "--pipeline-model-parallel-size (2)"]),
    "global batch": (["--global-batch-size", "6"],
                     ["--global-batch-size (6)", "--micro-batch-size (4)", "data-parallel size (1)"]),
    "fake_grad through under PP": (["--pipeline-model-parallel-size", "2", "--apex-variant", "paper",
                                    "--fake-grad", "through"],
                                   ["--fake-grad through", "--pipeline-model-parallel-size 2"]),
    "direct schedule under PP": (["--pipeline-model-parallel-size", "2", "--apex-schedule", "direct"],
                                 ["--apex-schedule direct", "--pipeline-model-parallel-size 2"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_configs_that_cannot_work_fail_at_start_naming_the_flags(tmp_path, capsys, name):
    """Through the entry script's error handler (in this process: every check runs before the
    model or any checkpoint exists): exit code 2, one line naming the flags."""
    spec = importlib.util.spec_from_file_location("pretrain_apex_dit", ENTRY)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    args, needles = BAD[name]
    save = tmp_path / "run"
    code = entry.main([*BASE, "--train-iters", "1", "--save", str(save), *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not (save / "latest").exists()


# ---- 7. recompute really recomputes ----------------------------------------------------------

def test_recompute_replays_the_forward_in_backward():
    """Same gradients with and without recompute, and the checkpointed piece runs twice per
    training step with it (forward, then again in backward) but once without it."""
    from megatron_apex.families import build_model, get_model_config
    from megatron_apex.parallel import init_distributed, set_seed
    from megatron_apex.parallel.recompute import enable_activation_recompute

    init_distributed(1, 1)
    config = get_model_config("qwen-image-tiny-test")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 4, 4, generator=g), torch.rand(2, generator=g)
    context = torch.randn(2, 3, config.joint_attention_dim, generator=g)
    results = {}
    for granularity in (None, "full", "selective"):
        set_seed(7)
        model = build_model(config, backend="local")
        with torch.no_grad():  # move the zero-initialised output head so gradients reach the layers
            model.proj_out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            for layer in model.layers:
                for mod in (layer.img_modulation, layer.txt_modulation):
                    mod.linear.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
        calls = []
        for layer in model.layers:
            piece = layer if granularity != "selective" else layer.attention.core_attention
            inner = piece.forward
            piece.forward = lambda *a, _inner=inner, **k: (calls.append(1), _inner(*a, **k))[1]
        if granularity:
            enable_activation_recompute(model, granularity)
        model(x, t, context).square().mean().backward()
        results[granularity] = (len(calls), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    layers = config.num_layers
    assert results[None][0] == layers
    assert results["full"][0] == results["selective"][0] == 2 * layers
    assert results[None][1]["layers.0.attention.linear_qkv.weight"].abs().max() > 0
    plain = results[None][1]
    for granularity in ("full", "selective"):
        grads = results[granularity][1]
        # A checkpointed layer back-propagates zeros into the pieces whose output the model
        # drops (the last layer's text tail): zero gradients where plain autograd leaves None.
        assert set(plain) <= set(grads)
        for name in grads:
            expected = plain.get(name, torch.zeros_like(grads[name]))
            diff, scale = (grads[name] - expected).abs().max().item(), expected.abs().max().item()
            assert diff <= 1e-6 * scale + 1e-12, (granularity, name, diff, scale)
