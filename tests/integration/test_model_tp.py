"""Every family's model with tensor parallelism 2 (two gloo processes,
workers/model_tp_worker.py) against single-process references: diffusers' forward and
gradients, and the TP=1 initialisation from the same seed."""

import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_torchrun

from family_cases import FAMILIES, dead_ends

pytest.importorskip("diffusers")
WORKER = Path(__file__).parent / "workers" / "model_tp_worker.py"

# Each rank holds half of every split tensor (the table's architectures: hidden 4 heads x 8 = 32):
# heads, MLP rows, and (x, gate) pairs of Sana's GLUMBConv (int(2.5 * 32) = 80 wide).
LOCAL_SHAPES = {
    "qwen-image": {
        "layers.0.attention.linear_qkv.weight": [3 * 32 // 2, 32],
        "layers.0.attention.linear_added_qkv.weight": [3 * 32 // 2, 32],
        "layers.0.attention.linear_proj.weight": [32, 32 // 2],
        "layers.0.img_modulation.linear.weight": [6 * 32 // 2, 32],
        "layers.0.img_mlp.linear_fc1.weight": [4 * 32 // 2, 32],
        "layers.0.img_mlp.linear_fc2.weight": [32, 4 * 32 // 2],
    },
    "sana": {
        "layers.0.attention.linear_qkv.weight": [3 * 32 // 2, 32],
        "layers.0.cross_attention.linear_k.weight": [2 * 8 // 2, 32],  # 2 cross heads x 8
        "layers.0.mlp.linear_fc1.weight": [2 * 80 // 2, 32],
        "layers.0.mlp.depthwise.weight": [2 * 80 // 2, 1, 3, 3],
        "layers.0.mlp.linear_fc2.weight": [32, 80 // 2],
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_equals_single_process(tmp_path, family):
    out = tmp_path / "model_tp.json"
    run_torchrun(WORKER, 2, [family, out], timeout=240)
    r = json.loads(out.read_text())
    assert r["tp"] == 2
    shapes = r["local_shapes"]
    for key, shape in LOCAL_SHAPES[family].items():
        assert shapes[key] == shape, key

    # forward and gradients vs diffusers; every weight but the dead ends gets a gradient
    assert r["ref_max"] > 0.1
    assert r["out_diff"] <= 1e-5
    assert r["grad_keys_match"]
    dead = dead_ends(family, r["num_layers"])
    assert dead <= set(r["grad_diff"])
    for key, (diff, scale) in r["grad_diff"].items():
        assert (scale > 0) != (key in dead), (key, scale)
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
