"""tools/convert_hf.py for Sana against diffusers' own files, forward and pipeline (the
independent references): import -> export reproduces a diffusers folder bit for bit, an
imported checkpoint computes what diffusers computes, verify catches a corrupted tensor, an
offline SanaPipeline around our export takes our one-step sampler's step, and bad input
fails with one message and no output left behind."""

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
from diffusers import SanaTransformer2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_apex.conversion import checkpoint_io, hf_export, hf_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(in_channels=2, out_channels=2, num_attention_heads=4, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=32, caption_channels=12,
            sample_size=8, patch_size=2)
TOL = 1e-5


def _tool():
    spec = importlib.util.spec_from_file_location("convert_hf_tool", ROOT / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()


def convert(*argv) -> int:
    return TOOL.main([str(a) for a in argv])


def random_diffusers(seed=0, dtype=torch.float32, **arch) -> SanaTransformer2DModel:
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**{**ARCH, **arch}).eval()
    randomize_weights_(model, seed + 1)
    return model.to(dtype)


def save_diffusers(path, seed=0, max_shard_size="5GB", dtype=torch.float32, **arch) -> Path:
    random_diffusers(seed, dtype, **arch).save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def read_folder(path) -> dict:
    with hf_io.SafetensorsFolder(str(path)) as folder:
        return {k: folder[k] for k in folder}


def leftovers(parent: Path, name: str) -> list:
    return [p for p in os.listdir(parent) if p == name or p.startswith(f".{name}.tmp")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_diffusers(tmp_path_factory.mktemp("hf") / "transformer", seed=3)


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt") / "imported"
    assert convert("import", "--model", "sana", "--hf-path", hf_dir, "--save", save) == 0
    return save


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["single-file", "bf16-sharded"])
def test_import_export_round_trip_is_bit_exact(tmp_path, layout):
    dtype = torch.bfloat16 if layout.startswith("bf16") else torch.float32
    hf = save_diffusers(tmp_path / "hf", seed=1, dtype=dtype, attention_bias=layout == "single-file",
                        max_shard_size="5GB" if layout == "single-file" else "20KB")
    assert (hf / hf_io.INDEX_NAME).is_file() == (layout != "single-file")  # the input layout under test

    # --model auto (the default) finds the family in config.json, then in the checkpoint
    assert convert("import", "--hf-path", hf, "--save", tmp_path / "ckpt", "--tensor-model-parallel-size", "2") == 0
    assert convert("export", "--load", tmp_path / "ckpt", "--hf-path", tmp_path / "out", "--max-shard-size",
                   "30KB") == 0

    original, exported = read_folder(hf), read_folder(tmp_path / "out")
    extras = sorted(set(exported) - set(original))
    assert extras and all(k.startswith("time_embed_2.emb.timestep_embedder.") for k in extras)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype == dtype, key
        assert torch.equal(exported[key], tensor), key
    assert torch.equal(exported["time_embed_2.emb.timestep_embedder.linear_1.weight"],
                       original["time_embed.emb.timestep_embedder.linear_1.weight"])
    assert not exported["time_embed_2.emb.timestep_embedder.linear_2.weight"].any()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    state = json.loads((tmp_path / "ckpt" / "iter_0000000" / "train_state.json").read_text())
    assert state["source"]["family"] == "sana" and state["model_name"].startswith("sana-")

    # stock diffusers loads it (the extra keys only warn) with the original weights
    stock = SanaTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(p, original[k]) for k, p in stock.state_dict().items())


def test_export_then_import_restores_apex_options_and_extras(tmp_path, hf_dir):
    first = tmp_path / "first"
    assert convert("import", "--model", "sana", "--hf-path", hf_dir, "--save", first, "--shift-kind", "diagonal",
                   "--shift-site", "input", "--target-time-embedder", "copy") == 0
    assert convert("export", "--model", "sana", "--load", first, "--hf-path", tmp_path / "hf2",
                   "--extras", "separate") == 0
    side = load_file(tmp_path / "hf2" / hf_io.EXTRAS_NAME)
    assert set(side) == {"condition_shift.A", "condition_shift.b"} | {
        f"time_embed_2.emb.timestep_embedder.linear_{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    assert side["condition_shift.A"].shape == (ARCH["caption_channels"],)  # the input site's width
    main = load_file(tmp_path / "hf2" / hf_io.WEIGHTS_NAME)
    assert not set(side) & set(main) and set(main) == set(read_folder(hf_dir))

    second = tmp_path / "second"
    assert convert("import", "--model", "sana", "--hf-path", tmp_path / "hf2", "--save", second) == 0
    assert convert("export", "--model", "sana", "--load", second, "--hf-path", tmp_path / "hf3",
                   "--extras", "separate") == 0
    a, b = read_folder(tmp_path / "hf2"), read_folder(tmp_path / "hf3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [json.loads((d / "iter_0000000" / "train_state.json").read_text()) for d in (first, second)]
    assert states[0]["model_config"] == states[1]["model_config"]
    assert states[1]["model_config"]["shift_kind"] == "diagonal"


# ----------------------------------------------------------------------------- loading and parity
def test_imported_checkpoint_loads_for_inference_and_matches_diffusers(imported, hf_dir):
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.models.sana.model import SanaModel

    model, state = load_model_for_inference(str(imported))
    assert isinstance(model, SanaModel) and state["iteration"] == 0
    assert state["source"]["config_sha256"] == hf_io.file_sha256(str(hf_dir / "config.json"))
    reference = SanaTransformer2DModel.from_pretrained(hf_dir).eval()

    gen = torch.Generator().manual_seed(11)
    b, c, h, w, L = 3, ARCH["in_channels"], 6, 10, 7
    x, t = torch.randn(b, c, h, w, generator=gen), torch.rand(b, generator=gen)
    ctx = torch.randn(b, L, ARCH["caption_channels"], generator=gen)
    mask = torch.zeros(b, L)
    for i, valid in enumerate((7, 4, 1)):  # a different padded length per sample
        mask[i, :valid] = 1
    with torch.no_grad():
        ref = reference(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t * 1000,
                        return_dict=False)[0]
        ours = model(x, t, ctx, mask)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= TOL


def test_verify_passes_and_fails_on_a_corrupted_tensor(imported, hf_dir, tmp_path, capsys):
    assert convert("verify", "--model", "sana", "--hf-path", hf_dir, "--batch", "3", "--grid", "3x5",
                   "--text-len", "6") == 0
    assert convert("verify", "--hf-path", hf_dir, "--load", imported) == 0
    assert "PASS" in capsys.readouterr().out

    bad = tmp_path / "corrupted"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / hf_io.WEIGHTS_NAME)
    weights["transformer_blocks.1.ff.conv_depth.weight"][7, 0, 1, 2] += 0.5
    save_file(weights, bad / hf_io.WEIGHTS_NAME, metadata={"format": "pt"})
    assert convert("verify", "--model", "sana", "--hf-path", bad, "--load", imported) == 1
    assert "FAIL" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors
def _expect_error(capsys, argv, *needles, out=None):
    assert convert(*argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    if out is not None:
        assert leftovers(out.parent, out.name) == []


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    weights = load_file(src / hf_io.WEIGHTS_NAME)
    edit(config, weights)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(weights, dst / hf_io.WEIGHTS_NAME, metadata={"format": "pt"})
    return dst


def test_wrong_or_unknown_family_is_refused(hf_dir, imported, tmp_path, capsys):
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


def test_unsupported_architecture_is_refused_before_writing(hf_dir, tmp_path, capsys):
    def guidance(config, weights):
        config["guidance_embeds"] = True

    src = _edited_copy(hf_dir, tmp_path / "sprint", guidance)
    out = tmp_path / "out"
    _expect_error(capsys, ["import", "--hf-path", src, "--save", out], "--hf-path", "guidance_embeds", out=out)
    _expect_error(capsys, ["import", "--model", "sana", "--hf-path", hf_dir, "--save", out,
                           "--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size", out=out)


def test_missing_unexpected_and_mis_shaped_keys_are_listed_together(hf_dir, tmp_path, capsys):
    def break_keys(config, weights):
        del weights["transformer_blocks.0.ff.conv_point.weight"]
        del weights["scale_shift_table"]
        weights["transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32)  # attention_bias is False
        weights["caption_projection.linear_1.weight"] = torch.zeros(32, 11)

    src = _edited_copy(hf_dir, tmp_path / "broken", break_keys)
    out = tmp_path / "out"
    _expect_error(capsys, ["import", "--model", "sana", "--hf-path", src, "--save", out],
                  "missing keys: scale_shift_table, transformer_blocks.0.ff.conv_point.weight",
                  "unexpected keys: transformer_blocks.0.attn1.to_q.bias",
                  "shape mismatches: caption_projection.linear_1.weight [32, 11] (expected [32, 12])", out=out)


def test_a_failure_while_writing_leaves_no_output(hf_dir, imported, tmp_path, monkeypatch):
    family = checkpoint_io.get_family("sana")

    def dies_in_close(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_io.PlannedSafetensorsWriter, "close", dies_in_close)
    with pytest.raises(RuntimeError, match="disk full"):
        hf_export.export_hf(family, str(imported), str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- diffusers pipeline
def _tiny_text_stack(width: int):
    """A BPE tokenizer trained here and a one-layer random Gemma-2 (Sana's text encoder family)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a photo of a cat", "a sketch of a dog on the grass", "an ankle boot"],
                            trainers.BpeTrainer(vocab_size=64, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=width // 2, pad_token_id=0)).eval()
    return tokenizer, encoder


def _tiny_dc_ae(latent_channels: int):
    from diffusers import AutoencoderDC

    torch.manual_seed(1)
    two = ("ResBlock", "ResBlock")
    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=4,
                         encoder_block_types=two, decoder_block_types=two, encoder_block_out_channels=(8, 8),
                         decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                         decoder_qkv_multiscales=((), ()), scaling_factor=0.5).eval()


def test_pipeline_with_exported_transformer_matches_our_one_step_sampler(imported, tmp_path):
    """diffusers' SanaPipeline, built offline (tokenizer trained here, random Gemma-2 and DC-AE),
    around our exported transformer takes the same NFE = 1 Euler step as
    megatron_apex.inference.samplers.sample on the imported checkpoint, and decodes it alike."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    assert convert("export", "--load", imported, "--hf-path", tmp_path / "hf") == 0
    transformer = SanaTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer, encoder = _tiny_text_stack(ARCH["caption_channels"])
    vae = _tiny_dc_ae(ARCH["in_channels"])
    # One Euler step from sigma 1 to 0 (Sana's released DPM-Solver starts at sigma 0.999).
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    assert_pipeline_matches_our_one_step(pipe, str(imported))


def assert_pipeline_matches_our_one_step(pipe, checkpoint: str) -> None:
    """``pipe`` (a SanaPipeline) and our NFE = 1 sampler on ``checkpoint`` take the same Euler step
    from the same noise and prompts, and the pipeline's VAE decodes ours as it decodes its own."""
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample

    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a dog on the grass"]
    h, w = 32, 16  # latent grid; the pipeline wants pixel sizes divisible by 32
    noise = torch.randn(2, pipe.transformer.config.in_channels, h, w, generator=torch.Generator().manual_seed(21))
    common = dict(prompt=prompts, height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor,
                  num_inference_steps=1, guidance_scale=1.0, latents=noise, use_resolution_binning=False,
                  complex_human_instruction=None, max_sequence_length=8, return_dict=False)
    with torch.no_grad():
        theirs = pipe(output_type="latent", **common)[0]
        images = pipe(output_type="pt", **common)[0]
        ctx, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=8,
                                             complex_human_instruction=None)
    assert mask[0].sum() < mask[1].sum() < mask.shape[1] + 1  # padded captions of different lengths

    model, _ = load_model_for_inference(checkpoint)
    ours = sample(model, noise, ctx, mask, nfe=1)  # tools/sample.py's default method
    assert (theirs - noise).abs().max() > 0.1  # the step moved the latents
    assert (ours - theirs).abs().max().item() <= TOL
    with torch.no_grad():
        decoded = pipe.vae.decode(ours / pipe.vae.config.scaling_factor, return_dict=False)[0]
    assert (pipe.image_processor.postprocess(decoded, output_type="pt") - images).abs().max().item() <= 1e-4
