"""megatron-core tensor, pipeline and data parallelism on 2 processes (gloo on CPU, nccl with CUDA).

Each worker (tests/integration/workers/) also computes an independent single-process
reference; rank 0 writes both to JSON and the comparison happens here.
"""

import json
from pathlib import Path

import torch
from dist_utils import run_torchrun

WORKERS = Path(__file__).parent / "workers"


def _run(worker, tmp_path):
    out = tmp_path / f"{worker}.json"
    run_torchrun(WORKERS / f"{worker}.py", 2, [out], timeout=180)
    return json.loads(out.read_text())


def _close(actual, expected, **tol):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), **tol)


def test_tp2_mlp_equals_dense_computation(tmp_path):
    r = _run("tp_mlp", tmp_path)
    assert (r["tp"], r["dp"]) == (2, 1)
    tol = dict(rtol=1e-5, atol=1e-5)
    _close(r["output"], r["dense_output"], **tol)
    _close(r["gathered_fc1"], r["dense_fc1"], **tol)
    _close(r["grad_fc1"], r["dense_grad_fc1"], **tol)
    _close(r["grad_fc2"], r["dense_grad_fc2"], **tol)


def test_pp2_one_f_one_b_matches_pp1(tmp_path):
    r = _run("pp_stack", tmp_path)
    assert r["schedule"] == "forward_backward_pipelining_without_interleaving"
    _close(r["losses"], r["ref_losses"], rtol=1e-6, atol=1e-6)
    assert len(r["grads"]) == len(r["ref_grads"]) == 4
    for (w, b), (ref_w, ref_b) in zip(r["grads"], r["ref_grads"]):
        _close(w, ref_w, rtol=1e-5, atol=1e-6)
        _close(b, ref_b, rtol=1e-5, atol=1e-6)


def test_dp2_distributed_optimizer_matches_one_process(tmp_path):
    r = _run("dp_optimizer", tmp_path)
    assert r["dp"] == 2
    _close(r["grad_norms"], r["ref_grad_norms"], rtol=1e-5, atol=0)
    assert min(r["ref_grad_norms"]) > 0.1  # the clip (0.1) is active in both steps
    for params in r["params_by_rank"]:
        assert set(params) == set(r["ref_params"])
        for name, value in params.items():
            _close(value, r["ref_params"][name], rtol=1e-5, atol=1e-6)
