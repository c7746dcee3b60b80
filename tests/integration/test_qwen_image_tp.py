"""QwenImageModel with tensor parallelism 2 (two gloo processes) against single-process
references: diffusers' forward and gradients, and the TP=1 initialisation from the same seed."""

import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_torchrun

pytest.importorskip("diffusers")
WORKER = Path(__file__).parent / "workers" / "qwen_tp_worker.py"


def test_tp2_equals_single_process(tmp_path):
    out = tmp_path / "qwen_tp.json"
    run_torchrun(WORKER, 2, [out], timeout=240)
    r = json.loads(out.read_text())
    assert r["tp"] == 2

    # forward and gradients vs diffusers
    assert r["ref_max"] > 0.1
    assert r["out_diff"] <= 1e-5
    assert r["grad_keys_match"]
    for key, (diff, scale) in r["grad_diff"].items():
        assert diff <= 1e-5 * max(1.0, scale), (key, diff, scale)
    assert r["num_replicated"] > 0 and r["replicated_rank_diff"] <= 1e-6

    # the same seed gives the same full weights for TP=1 and TP=2
    from megatron_apex.families import build_model, count_parameters, get_model_config
    from megatron_apex.parallel import init_distributed, set_seed

    init_distributed(1, 1)
    config = get_model_config(r["init_model"], **r["init_overrides"])
    set_seed(r["seed"])
    single = {k: v for k, v in build_model(config, backend="local").state_dict().items()
              if not k.endswith("_extra_state")}
    tp2 = torch.load(r["init_path"])
    assert tp2.keys() == single.keys()
    assert all(torch.equal(tp2[k], single[k]) for k in single)
    assert r["count"] == count_parameters(config) == sum(v.numel() for v in single.values())
