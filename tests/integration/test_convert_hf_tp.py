"""tools/convert_hf.py with tensor x pipeline parallelism 2 x 2, for every model family, against
single-process and diffusers references:

- import at TP=2 x PP=2 then export equals import at TP=1 then export equals the diffusers
  folder, bit for bit;
- the one-process import writes exactly the tensor pieces (keys, offsets, shapes) that four
  real TP=2 x PP=2 ranks save, and those ranks (this file run under torchrun) load it into
  their stages with the values of the diffusers weights sharded by the mapping table, and run
  the two stages (the stage tensor sent point to point) to diffusers' output;
- the checkpoint the four ranks save exports, from one process, to the diffusers folder;
- the trainer fine-tunes from an imported checkpoint (--load --finetune) and tools/sample.py
  samples from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # family_cases, also where torchrun runs this file
from family_cases import CASES, TOL, convert, read_folder  # noqa: E402

LAYERS = 4  # two per pipeline stage


# ============================================================================ torchrun worker
def worker(family: str, hf_path: str, imported: str, resave: str, out_json: str) -> None:
    """One of 4 ranks (TP=2 x PP=2): load the one-process import into this rank's stage, check
    it against the diffusers weights sharded by the table, run the pipeline forward, then save
    the stage as a real multi-rank checkpoint."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_apex import checkpoint
    from megatron_apex.conversion import hf_to_megatron, shard_for_tp
    from megatron_apex.conversion.hf_io import SafetensorsFolder
    from megatron_apex.families import get_family, get_model_config
    from megatron_apex.parallel import init_distributed
    from megatron_apex.training.pipeline_apex import build_stage_model

    case = CASES[family]
    init_distributed(2, 2)
    ckpt = checkpoint.resolve_checkpoint(imported)
    state = checkpoint.read_train_state(ckpt)
    config = get_model_config(state["model_name"], **{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in state["model_config"].items()})
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    # built, sharded and loaded exactly as the trainer does it
    model = build_stage_model(config)
    torch.manual_seed(100 + dist.get_rank())
    with torch.no_grad():  # anything but the checkpoint's values
        for p in model.parameters():
            p.normal_()

    def sharded():
        return checkpoint.mark_tp_replicas(model.sharded_state_dict(prefix="model."))

    loaded = checkpoint.load_checkpoint(ckpt, {"model": sharded()})
    model.load_state_dict(checkpoint.module_state_dict(loaded["model"], "model.", model))

    # expected: diffusers weights -> ours (full) -> this TP rank's slice -> this stage's keys
    with SafetensorsFolder(hf_path) as folder:
        full = hf_to_megatron(folder, config)
    expected = shard_for_tp(full, get_family(family).mapping_table(config), config.num_layers, tp_rank, tp)
    mismatched, compared = [], 0
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        if key.startswith("layers."):
            local, rest = key.split(".", 2)[1:]
            key = f"layers.{model.layer_offset + int(local)}.{rest}"
        compared += 1
        if not torch.equal(value, expected[key]):
            mismatched.append(key)

    # the pipeline forward: stage 0 sends its stage tensor to its stage-1 peer
    gen = torch.Generator().manual_seed(4)
    B, H, W, L = 3, 6, 10, 5
    x, t = torch.randn(B, case.arch["out_channels"], H, W, generator=gen), torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, case.context_width, generator=gen)
    mask = torch.ones(B, L)
    mask[0, 3:] = 0
    model.eval()
    out_diff = ref_max = None
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            dist.send(model(x, t, ctx, mask).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        else:
            received = torch.empty(model.stage_tensor_shape(B, L, H, W))
            dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(received)
            out = model(x, t, ctx, mask)
            ref = case.velocity(case.diffusers_model().from_pretrained(hf_path).eval(), x, t, ctx, mask)
            out_diff, ref_max = (out - ref).abs().max().item(), ref.abs().max().item()

    checkpoint.save_checkpoint(resave, 0, {"model": sharded()}, state)
    result = {"rank": dist.get_rank(), "tp_rank": tp_rank, "pp_rank": pp_rank, "compared": compared,
              "mismatched": mismatched, "layers": [model.layer_offset, model.num_local_layers],
              "out_diff": out_diff, "ref_max": ref_max}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        tmp = out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(gathered, f)
        os.replace(tmp, out_json)
    dist.barrier()


# ============================================================================ tests
def _convert(*argv):
    assert convert(*argv) == 0


def _stored_chunks(ckpt):
    """{(key, offsets, sizes)} of every tensor piece in a checkpoint's torch-DCP metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt)).read_metadata()
    return {(key, tuple(c.offsets), tuple(c.sizes)) for key, item in meta.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata) for c in item.chunks}


# (family, tensors a TP=2 import stores as two pieces)
SPLIT = [
    pytest.param("qwen-image", ("model.layers.0.attention.linear_qkv.weight",), id="qwen-image"),
    pytest.param("sana", ("model.layers.0.attention.linear_qkv.weight", "model.layers.3.mlp.depthwise.weight",
                          "model.layers.1.mlp.linear_fc2.weight", "model.time_modulation.weight"), id="sana"),
]


@pytest.mark.parametrize("family,split", SPLIT)
def test_tp2_pp2_import_and_export_match_single_process_and_real_ranks(tmp_path, family, split):
    pytest.importorskip("diffusers")
    from dist_utils import run_torchrun

    hf = CASES[family].save_diffusers(tmp_path / "hf", seed=5, max_shard_size="40KB", num_layers=LAYERS)
    _convert("import", "--model", family, "--hf-path", hf, "--save", tmp_path / "tp2pp2",
             "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2)
    _convert("import", "--model", family, "--hf-path", hf, "--save", tmp_path / "tp1")
    for name in ("tp2pp2", "tp1"):
        _convert("export", "--model", family, "--load", tmp_path / name, "--hf-path", tmp_path / f"{name}_hf")
    original, a, b = read_folder(hf), read_folder(tmp_path / "tp2pp2_hf"), read_folder(tmp_path / "tp1_hf")
    assert a.keys() == b.keys() and set(original) < set(a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], original[k]) for k in original)
    for name in ("tp2pp2_hf", "tp1_hf"):
        assert json.loads((tmp_path / name / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    # the TP=2 import really holds two pieces of each split tensor (the TP=1 one holds one)
    emulated = _stored_chunks(tmp_path / "tp2pp2" / "iter_0000000")
    single = _stored_chunks(tmp_path / "tp1" / "iter_0000000")
    for key in split:
        assert len([c for c in emulated if c[0] == key]) == 2, key
        assert len([c for c in single if c[0] == key]) == 1, key

    out = tmp_path / "ranks.json"
    run_torchrun(Path(__file__), 4, ["--worker", family, hf, tmp_path / "tp2pp2", tmp_path / "resaved", out],
                 timeout=300)
    ranks = json.loads(out.read_text())
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted({tuple(r["layers"]) for r in ranks}) == [(0, 2), (2, 2)]
    for r in ranks:
        assert r["compared"] > 20 and r["mismatched"] == [], r
        if r["pp_rank"] == 1:  # the last stage's output after the point-to-point hand-over
            assert r["ref_max"] > 0.1 and r["out_diff"] <= TOL, r

    # four real ranks store exactly the pieces the one-process import wrote
    assert _stored_chunks(tmp_path / "resaved" / "iter_0000000") == emulated
    # the family found in the checkpoint
    _convert("export", "--load", tmp_path / "resaved", "--hf-path", tmp_path / "resaved_hf")
    c = read_folder(tmp_path / "resaved_hf")
    assert c.keys() == a.keys() and all(torch.equal(c[k], a[k]) for k in a)


# (family, its trainer objective, whether to check the trainer refuses --load without --finetune:
# the trainer's check, the same for every family, run once)
FINETUNES = [
    pytest.param("qwen-image", ("--objective", "fm"), True, id="qwen-image"),
    pytest.param("sana", ("--objective", "apex", "--apex-variant", "released"), False, id="sana"),
]


@pytest.mark.parametrize("family,objective,check_refusal", FINETUNES)
def test_trainer_finetunes_and_sample_py_samples_from_an_imported_checkpoint(tmp_path, family, objective,
                                                                            check_refusal):
    """The built-in dataset's shapes (28x28 grey, 4x4 patches, MiniLM 384-d text): a diffusers
    model with the family's tiny architecture and one layer, imported and fine-tuned."""
    pytest.importorskip("diffusers")
    from megatron_apex.families import get_family, get_model_config

    case = CASES[family]
    tiny = get_model_config(case.tiny)
    arch = {k: getattr(tiny, k) for k in get_family(family).arch_fields}
    hf = case.save_diffusers(tmp_path / "hf", seed=9, **{**arch, "num_layers": 1})
    ckpt = tmp_path / "imported"
    _convert("import", "--hf-path", hf, "--save", ckpt)  # the family found in config.json
    # this process's own group (the in-process import) holds MASTER_PORT: children pick their own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    common = ["--model", case.tiny, "--num-layers", "1", "--micro-batch-size", "4", "--global-batch-size", "4",
              "--log-interval", "1", "--no-progress", *objective]

    if check_refusal:
        refused = subprocess.run([sys.executable, str(REPO / "examples" / "pretrain_apex_dit.py"), *common,
                                  "--train-iters", "1", "--load", str(ckpt)], capture_output=True, text=True,
                                 env=env, cwd=REPO, timeout=600)
        assert refused.returncode != 0 and "--finetune" in refused.stderr + refused.stdout

    # --lr 0: one real training step that must leave the loaded weights exactly as imported
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "pretrain_apex_dit.py"), *common,
                           "--train-iters", "1", "--lr", "0", "--ema-decay", "0.9", "--load", str(ckpt), "--finetune",
                           "--save", str(run)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fine-tuning from the weights" in proc.stdout + proc.stderr
    assert (run / "latest").read_text().strip() == "1"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 1 and metrics[-1]["grad_norm"] > 0  # a real step, lr 0
    original = read_folder(hf)
    for weights in ("model", "ema"):  # the EMA starts from the loaded weights; lr 0 keeps both
        _convert("export", "--model", family, "--load", run, "--hf-path", tmp_path / f"trained_{weights}",
                 "--weights", weights)
        trained = read_folder(tmp_path / f"trained_{weights}")
        assert all(torch.equal(trained[k], original[k]) for k in original), weights

    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "sample.py"), "--load", str(ckpt), "--nfe", "1",
                           "--num-per-prompt", "1", "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import numpy as np

    images = np.load(str(out) + ".npz")["images"]
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        sys.exit("usage: test_convert_hf_tp.py --worker FAMILY HF_PATH IMPORTED RESAVE OUT_JSON")
