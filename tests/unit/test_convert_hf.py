"""tools/convert_hf.py against diffusers' own files and forward (the independent reference):
import -> export reproduces a diffusers folder bit for bit, an imported checkpoint computes
what diffusers computes, verify catches a corrupted tensor, and a failure while writing leaves
no output behind (bad input and its one-line errors: tests/unit/test_bad_inputs.py)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from megatron_apex.conversion.random_weights import randomize_weights_

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_apex.conversion import checkpoint_io, hf_export, hf_import, hf_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=12, axes_dims_rope=(2, 2, 4))
TOL = 1e-5


def _tool():
    spec = importlib.util.spec_from_file_location("convert_hf_tool", ROOT / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()


def convert(*argv) -> int:
    return TOOL.main([str(a) for a in argv])


def random_diffusers(seed=0, dtype=torch.float32, **arch) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**ARCH, **arch}).eval()
    randomize_weights_(model, seed + 1)
    return model.to(dtype)


def save_diffusers(path, seed=0, max_shard_size="5GB", dtype=torch.float32, **arch) -> Path:
    random_diffusers(seed, dtype, **arch).save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def read_folder(path) -> dict:
    with hf_io.SafetensorsFolder(str(path)) as folder:
        return {k: folder[k] for k in folder}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_diffusers(tmp_path_factory.mktemp("hf") / "transformer", seed=3)


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt") / "imported"
    assert convert("import", "--model", "qwen-image", "--hf-path", hf_dir, "--save", save) == 0
    return save


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["single-file", "sharded", "bf16-sharded"])
def test_import_export_round_trip_is_bit_exact(tmp_path, layout):
    dtype = torch.bfloat16 if layout.startswith("bf16") else torch.float32
    hf = save_diffusers(tmp_path / "hf", seed=1, dtype=dtype,
                        max_shard_size="5GB" if layout == "single-file" else "20KB")
    index = hf / hf_io.INDEX_NAME
    assert index.is_file() == (layout != "single-file")  # the input layout under test
    if index.is_file():
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 3

    assert convert("import", "--model", "qwen-image", "--hf-path", hf, "--save", tmp_path / "ckpt",
                   "--tensor-model-parallel-size", "2") == 0
    assert convert("export", "--model", "qwen-image", "--load", tmp_path / "ckpt", "--hf-path", tmp_path / "out",
                   "--max-shard-size", "30KB") == 0

    original, exported = read_folder(hf), read_folder(tmp_path / "out")
    extras = sorted(set(exported) - set(original))
    assert extras and all(k.startswith("time_text_embed_2.") for k in extras)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype == dtype, key
        assert torch.equal(exported[key], tensor), key
    # time_text_embed_2 filled the default way: linear_1 copied, linear_2 zero
    assert torch.equal(exported["time_text_embed_2.timestep_embedder.linear_1.weight"],
                       original["time_text_embed.timestep_embedder.linear_1.weight"])
    assert not exported["time_text_embed_2.timestep_embedder.linear_2.weight"].any()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    # the export is itself sharded with an index whose map covers every key
    weight_map = json.loads((tmp_path / "out" / hf_io.INDEX_NAME).read_text())["weight_map"]
    assert set(weight_map) == set(exported)

    # stock diffusers loads it (the extra keys only warn) and computes what the original does
    stock = QwenImageTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(p, original[k]) for k, p in stock.state_dict().items())


def test_export_then_import_restores_apex_options_and_extras(tmp_path, hf_dir):
    """A checkpoint with a learnable full condition shift and a copied target embedder:
    export (extras in a side file) -> import gives back the same weights and config."""
    first = tmp_path / "first"
    assert convert("import", "--model", "qwen-image", "--hf-path", hf_dir, "--save", first,
                   "--shift-kind", "full", "--target-time-embedder", "copy") == 0
    assert convert("export", "--model", "qwen-image", "--load", first, "--hf-path", tmp_path / "hf2",
                   "--extras", "separate") == 0
    side = load_file(tmp_path / "hf2" / hf_io.EXTRAS_NAME)
    assert set(side) == {"condition_shift.A", "condition_shift.b"} | {
        f"time_text_embed_2.timestep_embedder.linear_{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    main = load_file(tmp_path / "hf2" / hf_io.WEIGHTS_NAME)
    assert not set(side) & set(main) and set(main) == set(read_folder(hf_dir))

    second = tmp_path / "second"
    assert convert("import", "--model", "qwen-image", "--hf-path", tmp_path / "hf2", "--save", second) == 0
    assert convert("export", "--model", "qwen-image", "--load", second, "--hf-path", tmp_path / "hf3",
                   "--extras", "separate") == 0
    a, b = read_folder(tmp_path / "hf2"), read_folder(tmp_path / "hf3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [json.loads((d / "iter_0000000" / "train_state.json").read_text()) for d in (first, second)]
    assert states[0]["model_config"] == states[1]["model_config"]
    assert states[1]["model_config"]["shift_kind"] == "full"


def test_export_keeps_the_imported_config_json_of_another_diffusers_version(hf_dir, tmp_path):
    """A release's config.json (older diffusers: no zero_cond_t etc., a field this version does
    not know) comes back as it was."""
    def older(config, weights):
        for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            del config[key]
        config.update(_diffusers_version="0.34.0.dev0", pooled_projection_dim=768)

    src = _edited_copy(hf_dir, tmp_path / "older", older)
    assert convert("import", "--model", "qwen-image", "--hf-path", src, "--save", tmp_path / "ckpt") == 0
    assert convert("export", "--model", "qwen-image", "--load", tmp_path / "ckpt", "--hf-path", tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


# ----------------------------------------------------------------------------- loading and parity
def test_imported_checkpoint_loads_for_inference_and_matches_diffusers(imported, hf_dir):
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    model, state = load_model_for_inference(str(imported))
    assert state["iteration"] == 0 and not state["has_ema"] and "scheduler" not in state
    assert state["args"]["data"]["data_path"] is None
    assert state["source"]["config_sha256"] == hf_io.file_sha256(str(hf_dir / "config.json"))
    reference = QwenImageTransformer2DModel.from_pretrained(hf_dir).eval()

    gen = torch.Generator().manual_seed(11)
    b, c, h, w, L = 3, ARCH["out_channels"], 6, 10, 7
    x, t = torch.randn(b, c, h, w, generator=gen), torch.rand(b, generator=gen)
    ctx = torch.randn(b, L, ARCH["joint_attention_dim"], generator=gen)
    mask = torch.zeros(b, L)
    for i, valid in enumerate((7, 4, 1)):  # a different padded length per sample
        mask[i, :valid] = 1
    with torch.no_grad():
        # the reference, written out here rather than through the tool's own helper
        tokens = reference(hidden_states=pack_latents(x, 2), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
                           timestep=t, img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
        ref = unpack_latents(tokens, h, w, 2)
        ours = model(x, t, ctx, mask)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= TOL


def test_verify_passes_and_fails_on_a_corrupted_tensor(imported, hf_dir, tmp_path, capsys):
    assert convert("verify", "--model", "qwen-image", "--hf-path", hf_dir, "--batch", "3", "--grid", "3x5",
                   "--text-len", "6") == 0
    assert convert("verify", "--model", "qwen-image", "--hf-path", hf_dir, "--load", imported) == 0
    assert "PASS" in capsys.readouterr().out

    bad = tmp_path / "corrupted"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / hf_io.WEIGHTS_NAME)
    weights["transformer_blocks.1.attn.add_k_proj.weight"][3, 5] += 0.5
    save_file(weights, bad / hf_io.WEIGHTS_NAME, metadata={"format": "pt"})
    assert convert("verify", "--model", "qwen-image", "--hf-path", bad, "--load", imported) == 1
    assert "FAIL" in capsys.readouterr().out


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    weights = load_file(src / hf_io.WEIGHTS_NAME)
    edit(config, weights)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(weights, dst / hf_io.WEIGHTS_NAME, metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- errors
# Bad folders, paths and flags and their one-line errors: tests/unit/test_bad_inputs.py (hf-* rows).
def test_a_failure_while_writing_leaves_no_output(hf_dir, imported, tmp_path):
    """Failures in the middle of the stream, after part of the data is on disk."""
    family = checkpoint_io.get_family("qwen-image")
    converted = []

    def dies_at_the_fifth(key, tensor):
        converted.append(key)
        if len(converted) == 5:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf_import.import_hf(family, str(hf_dir), str(tmp_path / "ckpt"), 2, on_convert=dies_at_the_fifth)
    assert len(converted) == 5
    reads = []

    def dies_at_the_third(keys):
        reads.append(keys)
        if len(reads) == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf_export.export_hf(family, str(imported), str(tmp_path / "hf"), max_shard_size="10KB",
                                read_group_bytes=1, on_read=dies_at_the_third)
    assert len(reads) == 3
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- helpers
def test_writer_streams_planned_shards_that_safetensors_reads(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10 + i) for i in range(6)}  # 400..600 bytes each
    tensors["half"] = torch.randn(3, 5).to(torch.bfloat16)
    plan = [(k, t.shape, t.dtype) for k, t in tensors.items()]
    writer = hf_io.PlannedSafetensorsWriter(str(tmp_path), plan, max_shard_size=1200)
    for key, tensor in tensors.items():
        writer.add(key, tensor.t().t()[:, :])  # a view: only its own elements are written
    names = writer.close()
    index = json.loads((tmp_path / hf_io.INDEX_NAME).read_text())
    sizes = {}
    for key, name in index["weight_map"].items():
        sizes[name] = sizes.get(name, 0) + tensors[key].numel() * tensors[key].element_size()
    assert max(sizes.values()) <= 1200 and len(sizes) == len(names) - 1 == 3  # 840, 1000, 1190 bytes
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    read = {}
    for name in sizes:  # safetensors' own reader: headers, offsets and data are valid
        read.update(load_file(tmp_path / name))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], t) for k, t in tensors.items())
    (tmp_path / "config.json").write_text("{}")
    folder = hf_io.SafetensorsFolder(str(tmp_path))
    assert {k: folder.shape(k) for k in folder} == {k: tuple(t.shape) for k, t in tensors.items()}

    other = hf_io.PlannedSafetensorsWriter(str(tmp_path / "x"), plan, max_shard_size=1200)
    with pytest.raises(ValueError, match="'t1'.*arrived where the plan has 't0'"):
        other.add("t1", tensors["t1"])
    assert hf_io.parse_size("5GB") == 5 * 10 ** 9 and hf_io.parse_size("2MiB") == 2 * 2 ** 20
    with pytest.raises(ValueError, match="--max-shard-size"):
        hf_io.parse_size("lots")


# ----------------------------------------------------------------------------- diffusers pipeline
def test_pipeline_with_exported_transformer_matches_our_one_step_sampler(imported, tmp_path):
    """diffusers' QwenImagePipeline (built offline: no VAE or text encoder needed for latent
    output with prompt_embeds) around our exported transformer takes the same NFE = 1 Euler
    step as megatron_apex.inference.samplers.sample on the imported checkpoint."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    assert convert("export", "--model", "qwen-image", "--load", imported, "--hf-path", tmp_path / "hf") == 0
    transformer = QwenImageTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    # Qwen-Image's scheduler shifts sigmas by image size; with one step sigma goes 1 -> 0 anyway.
    # (Its released shift_terminal=0.02 turns a single step into 0/0 = NaN in diffusers 0.42.1.)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)

    gen = torch.Generator().manual_seed(21)
    b, c, h, w, L = 2, ARCH["out_channels"], 6, 8, 5
    noise = torch.randn(b, c, h, w, generator=gen)
    ctx = torch.randn(b, L, ARCH["joint_attention_dim"], generator=gen)
    mask = torch.ones(b, L)
    mask[1, 3:] = 0
    with torch.no_grad():
        packed = pipe(prompt_embeds=ctx, prompt_embeds_mask=mask, latents=pack_latents(noise, 2),
                      height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor, num_inference_steps=1,
                      output_type="latent", return_dict=False)[0]
    theirs = unpack_latents(packed, h, w, 2)

    model, _ = load_model_for_inference(str(imported))
    ours = sample(model, noise, ctx, mask, nfe=1, method="euler")
    assert (theirs - noise).abs().max() > 0.1  # the step moved the latents
    assert (ours - theirs).abs().max().item() <= TOL
