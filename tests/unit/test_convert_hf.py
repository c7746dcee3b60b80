"""tools/convert_hf.py against diffusers' own files, forward and pipelines (the independent
references), for every model family: import -> export reproduces a diffusers folder bit for
bit, an imported checkpoint computes what diffusers computes, verify catches a corrupted tensor,
an offline pipeline around our export takes our one-step sampler's step, and a failure while
writing leaves no output behind (bad input and its one-line errors: tests/unit/test_bad_inputs.py
for Qwen-Image, the Sana rows below)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from family_cases import (  # noqa: E402
    CASES,
    FAMILIES,
    TOL,
    assert_sana_pipeline_matches_our_one_step,
    convert,
    read_folder,
    tiny_dc_ae,
    tiny_text_stack,
)
from megatron_apex.conversion import checkpoint_io, hf_export, hf_import, hf_io  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (a random diffusers folder of the family's table architecture, its import),
    each made once."""
    made = {}

    def folders(family):
        if family not in made:
            hf = CASES[family].save_diffusers(tmp_path_factory.mktemp("hf") / "transformer", seed=3)
            imported = tmp_path_factory.mktemp("ckpt") / "imported"
            assert convert("import", "--model", family, "--hf-path", hf, "--save", imported) == 0
            made[family] = hf, imported
        return made[family]

    return folders


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    weights = load_file(src / hf_io.WEIGHTS_NAME)
    edit(config, weights)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(weights, dst / hf_io.WEIGHTS_NAME, metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- round trips
# (family, input layout, --model named (else found in config.json, then in the checkpoint),
# architecture beyond the table's)
ROUND_TRIPS = [
    pytest.param("qwen-image", "single-file", True, {}, id="qwen-image-single-file"),
    pytest.param("qwen-image", "sharded", True, {}, id="qwen-image-sharded"),
    pytest.param("qwen-image", "bf16-sharded", True, {}, id="qwen-image-bf16-sharded"),
    pytest.param("sana", "single-file", False, {"attention_bias": True}, id="sana-single-file"),
    pytest.param("sana", "bf16-sharded", False, {}, id="sana-bf16-sharded"),
]


@pytest.mark.parametrize("family,layout,named,arch", ROUND_TRIPS)
def test_import_export_round_trip_is_bit_exact(tmp_path, family, layout, named, arch):
    case = CASES[family]
    dtype = torch.bfloat16 if layout.startswith("bf16") else torch.float32
    hf = case.save_diffusers(tmp_path / "hf", seed=1, dtype=dtype,
                             max_shard_size="5GB" if layout == "single-file" else "20KB", **arch)
    index = hf / hf_io.INDEX_NAME
    assert index.is_file() == (layout != "single-file")  # the input layout under test
    if index.is_file():
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 3

    model = ["--model", family] if named else []
    assert convert("import", *model, "--hf-path", hf, "--save", tmp_path / "ckpt",
                   "--tensor-model-parallel-size", "2") == 0
    assert convert("export", *model, "--load", tmp_path / "ckpt", "--hf-path", tmp_path / "out",
                   "--max-shard-size", "30KB") == 0

    original, exported = read_folder(hf), read_folder(tmp_path / "out")
    extras = sorted(set(exported) - set(original))
    assert extras and all(k.startswith(case.target_embedder + ".") for k in extras)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype == dtype, key
        assert torch.equal(exported[key], tensor), key
    # the target-time embedder filled the default way: linear_1 copied, linear_2 zero
    assert torch.equal(exported[f"{case.target_embedder}.linear_1.weight"],
                       original[f"{case.time_embedder}.linear_1.weight"])
    assert not exported[f"{case.target_embedder}.linear_2.weight"].any()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    # the export is itself sharded with an index whose map covers every key
    weight_map = json.loads((tmp_path / "out" / hf_io.INDEX_NAME).read_text())["weight_map"]
    assert set(weight_map) == set(exported)
    state = json.loads((tmp_path / "ckpt" / "iter_0000000" / "train_state.json").read_text())
    assert state["source"]["family"] == family and state["model_name"].startswith(family + "-")

    # stock diffusers loads it (the extra keys only warn) with the original weights
    stock = case.diffusers_model().from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(p, original[k]) for k, p in stock.state_dict().items())


# (family, the import's APEX options, the shape of the condition shift's A they give)
APEX_OPTIONS = [
    pytest.param("qwen-image", ("--shift-kind", "full"), (32, 32), id="qwen-image"),  # projected: 4 heads x 8
    pytest.param("sana", ("--shift-kind", "diagonal", "--shift-site", "input"), (12,), id="sana"),  # caption width
]


@pytest.mark.parametrize("family,options,a_shape", APEX_OPTIONS)
def test_export_then_import_restores_apex_options_and_extras(tmp_path, saved, family, options, a_shape):
    """A checkpoint with a learnable condition shift and a copied target embedder: export
    (extras in a side file) -> import gives back the same weights and config."""
    case, (hf_dir, _) = CASES[family], saved(family)
    first = tmp_path / "first"
    assert convert("import", "--model", family, "--hf-path", hf_dir, "--save", first, *options,
                   "--target-time-embedder", "copy") == 0
    assert convert("export", "--model", family, "--load", first, "--hf-path", tmp_path / "hf2",
                   "--extras", "separate") == 0
    side = load_file(tmp_path / "hf2" / hf_io.EXTRAS_NAME)
    assert set(side) == {"condition_shift.A", "condition_shift.b"} | {
        f"{case.target_embedder}.linear_{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    assert side["condition_shift.A"].shape == a_shape
    main = load_file(tmp_path / "hf2" / hf_io.WEIGHTS_NAME)
    assert not set(side) & set(main) and set(main) == set(read_folder(hf_dir))

    second = tmp_path / "second"
    assert convert("import", "--model", family, "--hf-path", tmp_path / "hf2", "--save", second) == 0
    assert convert("export", "--model", family, "--load", second, "--hf-path", tmp_path / "hf3",
                   "--extras", "separate") == 0
    a, b = read_folder(tmp_path / "hf2"), read_folder(tmp_path / "hf3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [json.loads((d / "iter_0000000" / "train_state.json").read_text()) for d in (first, second)]
    assert states[0]["model_config"] == states[1]["model_config"]
    assert states[1]["model_config"]["shift_kind"] == options[1]


@pytest.mark.parametrize("family", ["qwen-image"])
def test_export_keeps_the_imported_config_json_of_another_diffusers_version(saved, tmp_path, family):
    """A release's config.json (older diffusers: no zero_cond_t etc., a field this version does
    not know) comes back as it was."""
    def older(config, weights):
        for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            del config[key]
        config.update(_diffusers_version="0.34.0.dev0", pooled_projection_dim=768)

    src = _edited_copy(saved(family)[0], tmp_path / "older", older)
    assert convert("import", "--model", family, "--hf-path", src, "--save", tmp_path / "ckpt") == 0
    assert convert("export", "--model", family, "--load", tmp_path / "ckpt", "--hf-path", tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


# ----------------------------------------------------------------------------- loading and parity
@pytest.mark.parametrize("family", FAMILIES)
def test_imported_checkpoint_loads_for_inference_and_matches_diffusers(saved, family):
    from megatron_apex.inference.loading import load_model_for_inference

    case, (hf_dir, imported) = CASES[family], saved(family)
    model, state = load_model_for_inference(str(imported))
    assert isinstance(model, case.our_model_class())
    assert state["iteration"] == 0 and not state["has_ema"] and "scheduler" not in state
    assert state["args"]["data"]["data_path"] is None
    assert state["source"]["config_sha256"] == hf_io.file_sha256(str(hf_dir / "config.json"))
    reference = case.diffusers_model().from_pretrained(hf_dir).eval()

    gen = torch.Generator().manual_seed(11)
    b, c, h, w, L = 3, case.arch["out_channels"], 6, 10, 7
    x, t = torch.randn(b, c, h, w, generator=gen), torch.rand(b, generator=gen)
    ctx = torch.randn(b, L, case.context_width, generator=gen)
    mask = torch.zeros(b, L)
    for i, valid in enumerate((7, 4, 1)):  # a different padded length per sample
        mask[i, :valid] = 1
    with torch.no_grad():
        ref = case.velocity(reference, x, t, ctx, mask)
        ours = model(x, t, ctx, mask)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= TOL


# (family, a weight of the second block and an element of it to corrupt)
CORRUPTIONS = [
    pytest.param("qwen-image", "transformer_blocks.1.attn.add_k_proj.weight", (3, 5), id="qwen-image"),
    pytest.param("sana", "transformer_blocks.1.ff.conv_depth.weight", (7, 0, 1, 2), id="sana"),
]


@pytest.mark.parametrize("family,key,element", CORRUPTIONS)
def test_verify_passes_and_fails_on_a_corrupted_tensor(saved, tmp_path, capsys, family, key, element):
    hf_dir, imported = saved(family)
    assert convert("verify", "--model", family, "--hf-path", hf_dir, "--batch", "3", "--grid", "3x5",
                   "--text-len", "6") == 0
    assert convert("verify", "--hf-path", hf_dir, "--load", imported) == 0  # the family found in config.json
    assert "PASS" in capsys.readouterr().out

    bad = tmp_path / "corrupted"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / hf_io.WEIGHTS_NAME)
    weights[key][element] += 0.5
    save_file(weights, bad / hf_io.WEIGHTS_NAME, metadata={"format": "pt"})
    assert convert("verify", "--model", family, "--hf-path", bad, "--load", imported) == 1
    assert "FAIL" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("family", FAMILIES)
def test_a_failure_while_writing_leaves_no_output(saved, tmp_path, monkeypatch, family):
    """Failures in the middle of the stream, after part of the data is on disk, and in the
    last step (closing the shards)."""
    hf_dir, imported = saved(family)
    registered = checkpoint_io.get_family(family)
    converted = []

    def dies_at_the_fifth(key, tensor):
        converted.append(key)
        if len(converted) == 5:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf_import.import_hf(registered, str(hf_dir), str(tmp_path / "ckpt"), 2, on_convert=dies_at_the_fifth)
    assert len(converted) == 5
    reads = []

    def dies_at_the_third(keys):
        reads.append(keys)
        if len(reads) == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf_export.export_hf(registered, str(imported), str(tmp_path / "hf"), max_shard_size="10KB",
                            read_group_bytes=1, on_read=dies_at_the_third)
    assert len(reads) == 3

    def dies_in_close(self):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(hf_io.PlannedSafetensorsWriter, "close", dies_in_close)
        with pytest.raises(RuntimeError, match="disk full"):
            hf_export.export_hf(registered, str(imported), str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


# Bad folders, paths and flags of Qwen-Image and their one-line errors: tests/unit/test_bad_inputs.py
# (hf-* rows); Sana's:
def _expect_error(capsys, argv, *needles, out=None):
    assert convert(*argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    if out is not None:
        assert [p for p in os.listdir(out.parent) if p == out.name or p.startswith(f".{out.name}.tmp")] == []


@pytest.mark.parametrize("family", ["sana"])
def test_wrong_or_unknown_family_is_refused(saved, tmp_path, capsys, family):
    hf_dir, imported = saved(family)
    out = tmp_path / "out"
    _expect_error(capsys, ["import", "--model", "qwen-image", "--hf-path", hf_dir, "--save", out],
                  "SanaTransformer2DModel", "QwenImageTransformer2DModel", "--model sana", out=out)

    def flux(config, weights):
        config["_class_name"] = "FluxTransformer2DModel"

    src = _edited_copy(hf_dir, tmp_path / "flux", flux)
    _expect_error(capsys, ["import", "--hf-path", src, "--save", out], "--hf-path", "FluxTransformer2DModel",
                  "SanaTransformer2DModel", out=out)
    _expect_error(capsys, ["verify", "--model", "sana", "--hf-path", src], "FluxTransformer2DModel")
    _expect_error(capsys, ["export", "--model", "qwen-image", "--load", imported, "--hf-path", out], "--load", out=out)


@pytest.mark.parametrize("family", ["sana"])
def test_unsupported_architecture_is_refused_before_writing(saved, tmp_path, capsys, family):
    hf_dir, _ = saved(family)

    def guidance(config, weights):
        config["guidance_embeds"] = True

    src = _edited_copy(hf_dir, tmp_path / "sprint", guidance)
    out = tmp_path / "out"
    _expect_error(capsys, ["import", "--hf-path", src, "--save", out], "--hf-path", "guidance_embeds", out=out)
    _expect_error(capsys, ["import", "--model", "sana", "--hf-path", hf_dir, "--save", out,
                           "--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size", out=out)


@pytest.mark.parametrize("family", ["sana"])
def test_missing_unexpected_and_mis_shaped_keys_are_listed_together(saved, tmp_path, capsys, family):
    def break_keys(config, weights):
        del weights["transformer_blocks.0.ff.conv_point.weight"]
        del weights["scale_shift_table"]
        weights["transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32)  # attention_bias is False
        weights["caption_projection.linear_1.weight"] = torch.zeros(32, 11)

    src = _edited_copy(saved(family)[0], tmp_path / "broken", break_keys)
    out = tmp_path / "out"
    _expect_error(capsys, ["import", "--model", "sana", "--hf-path", src, "--save", out],
                  "missing keys: scale_shift_table, transformer_blocks.0.ff.conv_point.weight",
                  "unexpected keys: transformer_blocks.0.attn1.to_q.bias",
                  "shape mismatches: caption_projection.linear_1.weight [32, 11] (expected [32, 12])", out=out)


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


# ----------------------------------------------------------------------------- diffusers pipelines
@pytest.mark.parametrize("family", ["qwen-image"])
def test_qwen_image_pipeline_with_exported_transformer_matches_our_one_step_sampler(saved, tmp_path, family):
    """diffusers' QwenImagePipeline (built offline: no VAE or text encoder needed for latent
    output with prompt_embeds) around our exported transformer takes the same NFE = 1 Euler
    step as megatron_apex.inference.samplers.sample on the imported checkpoint."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample

    case, (_, imported) = CASES[family], saved(family)
    assert convert("export", "--model", family, "--load", imported, "--hf-path", tmp_path / "hf") == 0
    transformer = case.diffusers_model().from_pretrained(tmp_path / "hf").eval()
    # Qwen-Image's scheduler shifts sigmas by image size; with one step sigma goes 1 -> 0 anyway.
    # (Its released shift_terminal=0.02 turns a single step into 0/0 = NaN in diffusers 0.42.1.)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)

    noise, ctx, mask = case.pipeline_inputs()
    theirs = case.pipeline_latents(pipe, noise, ctx, mask, 1)

    model, _ = load_model_for_inference(str(imported))
    ours = sample(model, noise, ctx, mask, nfe=1, method="euler")
    assert (theirs - noise).abs().max() > 0.1  # the step moved the latents
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["sana"])
def test_sana_pipeline_with_exported_transformer_matches_our_one_step_sampler(saved, tmp_path, family):
    """diffusers' SanaPipeline, built offline (tokenizer trained here, random Gemma-2 and DC-AE),
    around our exported transformer takes the same NFE = 1 Euler step as
    megatron_apex.inference.samplers.sample on the imported checkpoint, and decodes it alike."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    case, (_, imported) = CASES[family], saved(family)
    assert convert("export", "--load", imported, "--hf-path", tmp_path / "hf") == 0
    transformer = case.diffusers_model().from_pretrained(tmp_path / "hf").eval()
    tokenizer, encoder = tiny_text_stack(case.context_width)
    vae = tiny_dc_ae(case.arch["in_channels"])
    # One Euler step from sigma 1 to 0 (Sana's released DPM-Solver starts at sigma 0.999).
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    assert_sana_pipeline_matches_our_one_step(pipe, str(imported))
