"""LoRA under tensor parallelism 2 (two gloo processes) against TP=1 in the same processes.

This file is also the torchrun worker. With the same full base weights and the same full
adapter values, TP=2 and TP=1 must give the same forward output and the same (unsharded)
gradients of every adapter and trainable extra; TP-replicated adapter tensors must get the
same gradient on both TP ranks; the adapters' initialisation, the base fingerprint and a
dist checkpoint of the trainable parameters (saved at TP=2, loaded at TP=1) must agree.
"""

import json
import os
import sys
from pathlib import Path

import torch

SEED = 1234
LORA = dict(rank=4, alpha=6.0, targets="all,img_in,txt_in,proj_out", init_seed=5)
MODEL_OVERRIDES = dict(num_attention_heads=4, attention_head_dim=8, axes_dims_rope=[2, 2, 4], shift_kind="full")


def test_tp2_lora_equals_tp1(tmp_path):
    import pytest

    pytest.importorskip("megatron.core")
    from dist_utils import run_torchrun

    out = tmp_path / "lora_tp.json"
    run_torchrun(Path(__file__), 2, [out], timeout=240)
    r = json.loads(out.read_text())
    assert r["tp"] == 2 and r["num_adapters"] == 2 * 10 + 1 + 3

    assert r["out_ref_max"] > 0.1
    assert r["out_diff"] <= 1e-5 * r["out_ref_max"]
    assert r["init_A_diff"] == 0.0  # the same adapters for every TP size
    assert r["grad_keys"] == r["ref_grad_keys"]
    nonzero = 0
    for key, (diff, scale) in r["grad_diff"].items():
        assert diff <= 1e-5 * scale + 1e-12, (key, diff, scale)
        nonzero += scale > 0
    assert nonzero >= len(r["grad_diff"]) - 8  # all but the last block's text-stream tail get gradients
    assert r["replicated_grad_rank_diff"] <= 1e-6 and r["num_replicated"] > 0
    assert r["frozen_without_grad"]
    assert r["ckpt_diff"] == 0.0 and r["ckpt_keys"] > 0
    assert r["fingerprint_matches"], r["fingerprint_error"]


# ============================================================================ torchrun worker
def _worker(out_path):
    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from _common import gather_objects, write_json_atomic
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_apex.conversion import merge_tp_shards, shard_for_tp
    from megatron_apex.families.qwen_image import qwen_image_mapping_table
    from megatron_apex.lora import (LoRAConfig, apply_lora, base_fingerprint, check_base_fingerprint, filter_trainable,
                                    full_lora_grads, full_lora_weights, load_trainable_state_dict, lora_modules,
                                    set_full_lora_weights_)
    from megatron_apex.families import build_model, get_model_config
    from megatron_apex.parallel import destroy_distributed, init_distributed, set_seed
    from megatron_apex.checkpoint import mark_tp_replicas, strip_prefix

    info = init_distributed(2, 1)
    config = get_model_config("qwen-image-tiny-test", **MODEL_OVERRIDES)
    table = qwen_image_mapping_table(config)
    lora = LoRAConfig(**LORA)

    # ---- TP=2 ----------------------------------------------------------------------------
    set_seed(SEED)
    model = build_model(config, backend="local")
    local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shapes = {k: tuple(v.shape) for k, v in merge_tp_shards(gather_objects(local), table, config.num_layers).items()}
    gen = torch.Generator().manual_seed(SEED)  # the same full random base on every rank
    full_base = {k: torch.randn(shapes[k], generator=gen) / (shapes[k][-1] ** 0.5) for k in sorted(shapes)}
    model.load_state_dict(shard_for_tp(full_base, table, config.num_layers, info.tp_rank, info.tp), strict=False)
    apply_lora(model, lora)
    adapters = lora_modules(model)
    init_A = {n: full_lora_weights(m)[0] for n, m in adapters.items()}
    values = {}
    for name in sorted(adapters):  # nonzero adapters, the same full values on every rank
        (shape_A, shape_B) = adapters[name].lora_full_shapes()
        values[name] = (torch.randn(shape_A, generator=gen) * 0.3, torch.randn(shape_B, generator=gen) * 0.3)
        set_full_lora_weights_(adapters[name], *values[name], name)

    B, C, H, W, L = 3, config.out_channels, 6, 10, 5
    x, t = torch.randn(B, C, H, W, generator=gen), torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, config.joint_attention_dim, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    fake = torch.tensor([True, False, True])
    t_target = t * 0.5
    weights = torch.randn(B, C, H, W, generator=gen)

    def run(m):
        out = m(x, t, ctx, mask, fake_condition=fake, t_target=t_target)
        (out * weights).sum().backward()
        grads = {}
        for name, mod in lora_modules(m).items():
            gA, gB = full_lora_grads(mod)
            grads[f"{name}.lora_A"], grads[f"{name}.lora_B"] = gA, gB
        for name, p in m.named_parameters():  # extras: replicated under TP
            if p.requires_grad and "lora_" not in name:
                grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        return out.detach(), grads

    out2, grads2 = run(model)
    frozen_ok = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    replicated = {n: p.grad for n, p in model.named_parameters()
                  if p.requires_grad and not getattr(p, "tensor_model_parallel", False) and p.grad is not None}
    both = gather_objects(replicated)
    replicated_diff = max((both[0][k] - both[1][k]).abs().max().item() for k in both[0])
    fp2 = base_fingerprint(model)

    ckpt = os.path.join(os.path.dirname(out_path), "lora_ckpt")
    if info.rank == 0:
        os.makedirs(ckpt)
    torch.distributed.barrier()
    dist_checkpointing.save(filter_trainable(mark_tp_replicas(model.sharded_state_dict(prefix="model.")), model), ckpt)
    torch.distributed.barrier()

    # ---- TP=1 (data parallel 2) in the same processes ---------------------------------------
    init_distributed(1, 1)
    assert ps.get_tensor_model_parallel_world_size() == 1
    set_seed(SEED)
    ref = build_model(config, backend="local")
    ref.load_state_dict(full_base, strict=False)
    apply_lora(ref, lora)
    ref_adapters = lora_modules(ref)
    init_diff = max((ref_adapters[n].lora_A - init_A[n]).abs().max().item() for n in ref_adapters)
    request = filter_trainable(mark_tp_replicas(ref.sharded_state_dict(prefix="model.")), ref)
    loaded = strip_prefix(dist_checkpointing.load(request, ckpt), "model.")
    load_trainable_state_dict(ref, loaded, strict=True)
    ckpt_diff = max(max((m.lora_A - values[n][0]).abs().max().item(), (m.lora_B - values[n][1]).abs().max().item())
                    for n, m in ref_adapters.items())
    out1, grads1 = run(ref)
    fp1 = base_fingerprint(ref)
    try:
        check_base_fingerprint(fp2, fp1, "the TP=2 fingerprint")
        fp_error = ""
    except ValueError as err:
        fp_error = str(err)

    if info.rank == 0:
        write_json_atomic(out_path, {
            "tp": info.tp, "num_adapters": len(adapters),
            "out_diff": (out2 - out1).abs().max().item(), "out_ref_max": out1.abs().max().item(),
            "init_A_diff": init_diff,
            "grad_keys": sorted(grads2), "ref_grad_keys": sorted(grads1),
            "grad_diff": {k: ((grads2[k] - grads1[k]).abs().max().item(), grads1[k].abs().max().item())
                          for k in grads1 if k in grads2},
            "replicated_grad_rank_diff": replicated_diff, "num_replicated": len(replicated),
            "frozen_without_grad": frozen_ok,
            "ckpt_diff": ckpt_diff, "ckpt_keys": len(loaded),
            "fingerprint_matches": not fp_error, "fingerprint_error": fp_error,
        })
    destroy_distributed()


if __name__ == "__main__":
    _worker(sys.argv[1])
