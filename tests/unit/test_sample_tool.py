"""tools/sample.py for every family and kind of checkpoint, against the diffusers pipelines:
(a) an imported Qwen-Image checkpoint with a diffusers pipeline folder (--pipeline), (b) an
imported Sana checkpoint with --text-encoder/--vae folders, (c) a model trained on
tools/prepare_data.py shards (encoders checked against the data's manifest, defaults from it),
(d) a LoRA run on that model. Tiny random VAEs and text encoders (Qwen2.5-VL, Gemma-2 with
MiniLM's tokenizer, as tests/unit/test_prepare_data.py builds them) stand in for the real ones.

Each case checks the text states against the pipeline's own `encode_prompt` (or the states the
model was trained on), and the written images against an independent decode of our sampler's
latents: the pipeline's own decode path (QwenImagePipeline / SanaPipeline called on our latents
with a transformer whose output is zero, so the scheduler step leaves them as they are), or
`vae.decode` written out here."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from test_prepare_data import _tiny_text_encoder  # noqa: E402
from tiny_vaes import tiny_vae  # noqa: E402

from megatron_apex.conversion.random_weights import randomize_weights_  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"sample_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE, CONVERT = _tool("sample"), _tool("convert_hf")


def sample(*argv) -> int:
    return SAMPLE.main([str(a) for a in argv])


def outputs(prefix: Path):
    """(npz contents, per-image PNGs as one array): the two must agree."""
    with np.load(str(prefix) + ".npz") as f:
        data = {k: f[k] for k in f.files}
    names = sorted(p.name for p in prefix.iterdir())
    files = np.stack([np.asarray(Image.open(prefix / n)) for n in names])
    if files.ndim == 3:
        files = files[..., None]
    assert (prefix.parent / (prefix.name + ".png")).is_file()
    np.testing.assert_array_equal(files, data["images"])
    return data, names


def reference_latents(load, context, mask, shape, per_prompt, nfe, method, seed=0, **guidance):
    """Our sampler on the independently encoded states, as the tool draws its noise."""
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample_seeded

    model, _ = load_model_for_inference(str(load))
    return sample_seeded(model, context.repeat_interleave(per_prompt, 0), mask.repeat_interleave(per_prompt, 0),
                         shape, nfe=nfe, method=method, seed=seed, **guidance)


def zero_velocity(transformer):
    """A copy of a diffusers transformer whose output is 0: the pipeline's Euler step is then the
    identity, and the pipeline only decodes the latents it is given."""
    still = copy.deepcopy(transformer)
    torch.nn.init.zeros_(still.proj_out.weight)
    torch.nn.init.zeros_(still.proj_out.bias)
    return still


def assert_images_close(ours: np.ndarray, theirs: np.ndarray):
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert theirs.std() > 5  # images, not a constant


def to_uint8_hwc(pixels01: torch.Tensor) -> np.ndarray:
    """A pipeline's `output_type="pt"` images ([0, 1], N C H W) as PIL would store them."""
    return (pixels01 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def qwen_drop(tok) -> int:
    """The tokens QwenImagePipeline drops (34 in Qwen2's tokenizer): the template's system part
    in this tokenizer, after the special tokens it puts first."""
    from megatron_apex.data.encoders import QWEN_TEMPLATE

    plain = tok("a", add_special_tokens=False)["input_ids"]
    lead = tok("a")["input_ids"].index(plain[0])
    return lead + len(tok(QWEN_TEMPLATE.split("{}")[0], add_special_tokens=False)["input_ids"])


def sana_instruction():
    """SanaPipeline.__call__'s default complex_human_instruction."""
    import inspect

    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


# ----------------------------------------------------------------------------- (a) Qwen-Image
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """An imported tiny Qwen-Image checkpoint and a saved QwenImagePipeline folder around it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    root = tmp_path_factory.mktemp("qwen")
    text_encoder, tok = _tiny_text_encoder("qwen2_5_vl", root / "te")
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(2, 2, 4)).eval()
    randomize_weights_(transformer, 1)
    transformer.save_pretrained(root / "transformer")
    assert CONVERT.main(["import", "--model", "qwen-image", "--hf-path", str(root / "transformer"),
                         "--save", str(root / "ckpt"), "--no-progress"]) == 0
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                             vae=tiny_vae("AutoencoderKLQwenImage").eval(), text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(root / "pipeline")
    pipe.prompt_template_encode_start_idx = qwen_drop(tok)
    pipe.set_progress_bar_config(disable=True)
    return root, pipe


def test_qwen_image_import_with_a_pipeline_folder(qwen):
    from megatron_apex.inference.loading import model_config_of, read_checkpoint
    from megatron_apex.inference.sampling_inputs import resolve
    from megatron_apex.models.qwen_image.model import pack_latents

    root, pipe = qwen
    prompts = ["a red fox in the snow", "two cups"]
    out = root / "samples"
    # the pipeline folder keeps the tokenizer apart from the text encoder
    assert not (root / "pipeline" / "text_encoder" / "tokenizer_config.json").exists()
    assert sample("--load", root / "ckpt", "--pipeline", root / "pipeline", "--prompt", prompts[0], "--prompt",
                  prompts[1], "--height", 24, "--width", 40, "--nfe", 2, "--method", "euler", "--num-per-prompt", 2,
                  "--out", out) == 0
    data, names = outputs(out)
    assert data["images"].shape == (4, 24, 40, 3)
    assert list(data["prompts"]) == [prompts[0]] * 2 + [prompts[1]] * 2 and "labels" not in data
    assert names == ["000_000.png", "000_001.png", "001_000.png", "001_001.png"]

    # the text states are QwenImagePipeline.encode_prompt's
    with torch.no_grad():
        theirs, their_mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=256)
    ckpt, state, _ = read_checkpoint(str(root / "ckpt"))
    inputs = resolve(ckpt, state, model_config_of(ckpt, state), pipeline=str(root / "pipeline"))
    context, mask, _ = SAMPLE.encode_text(inputs, prompts, guidance=False)
    assert their_mask.sum(1).tolist() == mask.sum(1).tolist() and len(set(mask.sum(1).tolist())) == 2
    for i in range(2):
        np.testing.assert_allclose(context[i][mask[i]].numpy(), theirs[i][their_mask[i].bool()].numpy(),
                                   rtol=1e-4, atol=1e-4)

    # the images are the pipeline's decode of our sampler's latents from those states
    latents = reference_latents(root / "ckpt", theirs, their_mask.bool(), (4, 12, 20), 2, nfe=2, method="euler")
    pipe.transformer = zero_velocity(pipe.transformer)
    with torch.no_grad():
        images = pipe(prompt_embeds=theirs.repeat_interleave(2, 0),
                      prompt_embeds_mask=their_mask.repeat_interleave(2, 0), latents=pack_latents(latents, 2),
                      height=24, width=40, num_inference_steps=1, output_type="pt", return_dict=False)[0]
    assert_images_close(data["images"], to_uint8_hwc(images))


# ----------------------------------------------------------------------------- (b) Sana
@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    """An imported tiny Sana checkpoint, its Gemma-2 folder (tokenizer inside) and DC-AE folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    root = tmp_path_factory.mktemp("sana")
    text_encoder, tok = _tiny_text_encoder("gemma2", root / "te")
    vae = tiny_vae("AutoencoderDC").eval()
    vae.save_pretrained(root / "vae")
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=24, sample_size=8,
                                         patch_size=2).eval()
    randomize_weights_(transformer, 2)
    transformer.save_pretrained(root / "transformer")
    assert CONVERT.main(["import", "--model", "sana", "--hf-path", str(root / "transformer"),
                         "--save", str(root / "ckpt"), "--no-progress"]) == 0
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return root, pipe


def test_sana_import_with_encoder_folders_and_guidance(sana):
    from megatron_apex.inference.loading import model_config_of, read_checkpoint
    from megatron_apex.inference.sampling_inputs import resolve

    root, pipe = sana
    prompts = ["A Dog", "an ankle boot on the grass, in the rain, under a blue sky"]  # SanaPipeline lower-cases them
    (root / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
    out = root / "samples"
    flags = ["--load", root / "ckpt", "--text-encoder", root / "te", "--vae", root / "vae", "--prompts",
             root / "prompts.txt", "--grid", "16x32", "--nfe", 2, "--method", "renoise", "--guidance-scale", 3,
             "--num-per-prompt", 2, "--max-text-len", 24]
    assert sample(*flags, "--out", out) == 0
    data, _ = outputs(out)
    assert data["images"].shape == (4, 32, 64, 3) and float(data["guidance_scale"]) == 3

    # the states of the prompts and of the empty prompt are SanaPipeline.encode_prompt's
    with torch.no_grad():
        theirs, their_mask, empty, empty_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device=torch.device("cpu"),
            max_sequence_length=24, complex_human_instruction=sana_instruction())
    ckpt, state, _ = read_checkpoint(str(root / "ckpt"))
    inputs = resolve(ckpt, state, model_config_of(ckpt, state), text_encoder=str(root / "te"),
                     vae=str(root / "vae"), max_text_len=24)
    context, mask, (uc, um) = SAMPLE.encode_text(inputs, prompts, guidance=True)
    for ours, our_mask, ref, ref_mask in ((context[0], mask[0], theirs[0], their_mask[0]),
                                          (context[1], mask[1], theirs[1], their_mask[1]),
                                          (uc, um, empty[0], empty_mask[0])):
        np.testing.assert_allclose(ours[our_mask].numpy(), ref[ref_mask.bool()].numpy(), rtol=1e-4, atol=1e-4)
    assert their_mask[0].sum() < their_mask[1].sum() == 24  # the longer prompt is cut at --max-text-len

    latents = reference_latents(root / "ckpt", theirs, their_mask.bool(), (4, 16, 32), 2, nfe=2, method="renoise",
                                guidance_scale=3.0, uncond_context=empty[0], uncond_mask=empty_mask[0].bool())
    pipe.transformer = zero_velocity(pipe.transformer)
    with torch.no_grad():
        images = pipe(prompt_embeds=theirs.repeat_interleave(2, 0),
                      prompt_attention_mask=their_mask.repeat_interleave(2, 0), latents=latents, height=32,
                      width=64, num_inference_steps=1, guidance_scale=1.0, use_resolution_binning=False,
                      output_type="pt", return_dict=False)[0]
    assert_images_close(data["images"], to_uint8_hwc(images))

    # without guidance the images change: the empty prompt's states were used
    assert sample(*flags[:-6], "--num-per-prompt", 2, "--max-text-len", 24, "--out", root / "plain") == 0
    assert np.abs(outputs(root / "plain")[0]["images"].astype(int) - data["images"]).max() > 2


# ----------------------------------------------------------------------------- (c), (d) prepared data
CAPTIONS = ["a grey square", "stripes on a shirt", "a round bag", "two boots"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Grey 16x16 images -> prepare_data with a tiny AutoencoderKL and Gemma-2 -> qwen-image-tiny-test
    trained 2 iterations on them, then a LoRA run of 2 iterations on that model."""
    from megatron_apex.data.prepare import PrepareConfig, prepare
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    root = tmp_path_factory.mktemp("prepared")
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "in" / f"{i}.png")
        (root / "in" / f"{i}.txt").write_text(CAPTIONS[i % 4])
    _tiny_text_encoder("gemma2", root / "te")  # 24 wide: qwen-image-tiny-test's text width
    tiny_vae("AutoencoderKL", image_channels=1, latent_channels=1).save_pretrained(root / "vae")
    prepare(PrepareConfig(inputs=[str(root / "in")], output=str(root / "data"), vae=str(root / "vae"),
                          text_encoder=str(root / "te"), resolution=16, patch_size=2, max_text_len=8,
                          samples_per_shard=8, progress=False), log=lambda m: None)
    common = ["--model", "qwen-image-tiny-test", "--data-path", str(root / "data"), "--micro-batch-size", "4",
              "--global-batch-size", "4", "--lr-warmup-iters", "0", "--log-interval", "100", "--no-progress",
              "--objective", "fm", "--train-iters", "2", "--lr", "1e-2"]
    Trainer(parse_args([*common, "--save", str(root / "run")])).train()
    Trainer(parse_args([*common, "--lora-rank", "4", "--lora-targets", "attn,img_in", "--lr", "2e-1",
                        "--pretrained-checkpoint", str(root / "run"), "--save", str(root / "lora")])).train()
    return root


def _stored_states(data: Path) -> dict:
    """caption -> the text states prepare_data stored for it (float16)."""
    import io
    import tarfile

    members = {}
    with tarfile.open(data / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    return {members[f"{k[:-len('.ctx.npy')]}.txt"].decode(): np.load(io.BytesIO(members[k])).astype(np.float32)
            for k in members if k.endswith(".ctx.npy")}


def _decode_by_hand(vae_dir: Path, latents: torch.Tensor) -> np.ndarray:
    """AutoencoderKL as the FLUX/SD pipelines decode: latents / scaling_factor + shift_factor."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("run, method, nfe", [("run", "flowmap", 1), ("lora", "release", 2)])
def test_a_model_trained_on_prepared_shards_and_its_lora(prepared, run, method, nfe, tmp_path):
    from megatron_apex.inference.prompts import pad_states

    root = prepared
    out = root / f"samples_{run}"
    encoders = ["--text-encoder", root / "te", "--vae", root / "vae"]
    assert sample("--load", root / run, *encoders, "--nfe", nfe, "--method", method, "--num-per-prompt", 2,
                  "--out", out) == 0
    data, _ = outputs(out)
    # defaults from the manifest: the data's captions, its square 16x16 bucket, grey images
    assert list(data["prompts"]) == [c for c in CAPTIONS for _ in range(2)]
    assert data["images"].shape == (8, 16, 16, 1)

    # the states the model was trained on, the one-step latents decoded by hand
    stored = _stored_states(root / "data")
    states = [stored[c] for c in CAPTIONS]
    context, mask = pad_states(states, 8)
    latents = reference_latents(root / run, context, mask, (1, 8, 8), 2, nfe=nfe, method=method)
    assert_images_close(data["images"], _decode_by_hand(root / "vae", latents))
    if run == "lora":  # the adapters change the images
        base = tmp_path / "base"
        assert sample("--load", root / "run", *encoders, "--nfe", nfe, "--method", method, "--num-per-prompt", 2,
                      "--out", base) == 0
        assert np.abs(data["images"].astype(int) - outputs(base)[0]["images"]).max() > 2


def test_bf16_samples_what_float32_samples(prepared, tmp_path):
    """--dtype bf16 (the GPU default) casts the model, its input casts and the VAE: run here on
    the CPU, the images stay near the float32 ones."""
    root = prepared
    flags = ["--load", root / "run", "--text-encoder", root / "te", "--vae", root / "vae", "--num-per-prompt", 1]
    assert sample(*flags, "--dtype", "fp32", "--out", tmp_path / "fp32") == 0
    assert sample(*flags, "--dtype", "bf16", "--out", tmp_path / "bf16") == 0
    a, b = (outputs(tmp_path / name)[0]["images"].astype(int) for name in ("fp32", "bf16"))
    diff = np.abs(a - b)
    assert 0 < diff.mean() < 3 and a.std() > 5, (diff.mean(), diff.max())


def test_encoders_that_do_not_fit_the_data_or_the_model_are_one_line(prepared, tmp_path, capsys):
    root = prepared
    cases = [
        # the data records its encoders' kinds, not their folders
        ([], "--data-path", "gemma2", "--text-encoder DIR"),
        (["--text-encoder", root / "te"], "--data-path", "AutoencoderKL", "--vae DIR"),
        (["--text-encoder", root / "te", "--vae", "none"], "--vae none", "cls"),
        (["--text-encoder", "minilm", "--vae", root / "vae"], "minilm", "384"),
        (["--text-encoder", root / "te", "--vae", root / "vae", "--height", 10, "--width", 16], "--height 10", "4"),
        (["--text-encoder", root / "te", "--vae", root / "vae", "--grid", "3x4"], "--grid 3x4", "patch size 2"),
        (["--pipeline", tmp_path], "--pipeline", "text_encoder"),
    ]
    for flags, *needles in cases:
        assert sample("--load", root / "run", *flags, "--out", tmp_path / "x") == 2, flags
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("sample.py: error:"), err
        assert all(str(n) in err for n in needles), (needles, err)
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- the launcher's closing samples
FAKE_PYTHON = """#!/usr/bin/env bash
# a stand-in for $PYTHON: records every call; tools/sample.py writes an npz (labels when LABELS=1)
if [ "$1" = "-c" ]; then exec "{real}" "$@"; fi
"{real}" -c 'import json, sys; open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + "\\n")' "$CALLS" "$@"
if [ "$1" = "tools/sample.py" ]; then
  "{real}" -c '
import os, sys, numpy as np
out = sys.argv[sys.argv.index("--out") + 1]
extra = dict(labels=np.zeros(2, np.int64)) if os.environ["LABELS"] == "1" else {{}}
np.savez(out + ".npz", images=np.zeros((2, 4, 4, 1), np.uint8), **extra)' "$@"
fi
"""


@pytest.mark.parametrize("data_path", [False, True])
def test_launcher_samples_a_data_path_run_without_scoring_it(tmp_path, data_path):
    import os
    import subprocess
    import sys

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable))
    fake.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    (tmp_path / "run").mkdir()
    user = ["--data-path", str(tmp_path / "data")] if data_path else []
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "NPROC_PER_NODE": "1",
           "LABELS": "0" if data_path else "1", "SAMPLE_ARGS": "--vae /v --text-encoder /t" if data_path else ""}
    subprocess.run(["bash", "examples/pretrain_apex_dit.sh", "--save", str(tmp_path / "run"), *user], check=True,
                   cwd=ROOT, env=env, timeout=60)
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert made[0][:2] == ["-m", "torch.distributed.run"]
    samples = [c for c in made if c[0] == "tools/sample.py"]
    scored = [c for c in made if c[0] == "tools/evaluate.py"]
    assert [c[c.index("--nfe") + 1] for c in samples] == ["1", "4"]
    for c in samples:
        assert c[c.index("--num-per-prompt") + 1] == ("4" if data_path else "100")
        assert c[c.index("--load") + 1] == str(tmp_path / "run")
        assert (c[-4:] == ["--vae", "/v", "--text-encoder", "/t"]) == data_path
    # the built-in class prompts are scored; a dataset's captions have no classes to score
    assert len(scored) == (0 if data_path else 2)
