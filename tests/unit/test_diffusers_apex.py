"""An exported APEX pipeline folder sampled through diffusers takes OUR steps: with a trained
(random, non-zero) target-time embedder, ``DiffusionPipeline.from_pretrained(export)`` gives the
latents of ``megatron_apex.inference.samplers`` on the checkpoint (NFE = 1 and 4, every method,
and tools/sample.py's seeded noise), for Qwen-Image and Sana; the stock pipeline on the same
folder takes the velocity head's Euler step instead, which is far from ours (so dropping or
ignoring the embedder fails these tests). Loading rules of the folder (stock classes, the side
file, no embedder) and the APEX classes' errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from family_cases import QWEN_IMAGE, ROOT, SANA, SANA_PROMPTS, assert_sana_pipeline_matches_our_one_step  # noqa: E402
from family_cases import convert, read_folder, tiny_dc_ae, tiny_text_stack  # noqa: E402
from megatron_apex.conversion import hf_io  # noqa: E402
from megatron_apex.inference.diffusers_apex import (  # noqa: E402
    ApexQwenImagePipeline,
    ApexQwenImageTransformer2DModel,
    ApexSanaPipeline,
    ApexSanaTransformer2DModel,
)
from test_convert_hf_pipeline import qwen_base  # noqa: E402,F401  (fixture: a saved offline QwenImagePipeline)

TOL = 1e-4
# (NFE, method): the one-step jump, and four steps of each sampler
RUNS = [(1, "flowmap"), (4, "flowmap"), (4, "release"), (4, "renoise"), (4, "euler")]


def with_trained_embedder(hf: Path, prefix: str, seed: int) -> Path:
    """Give a diffusers folder a target-time embedder of random non-zero weights (as training
    leaves it), in apex_extras.safetensors: the import keeps a folder's own embedder."""
    time_keys = {k: v for k, v in read_folder(hf).items() if ".timestep_embedder.linear_" in k}
    gen = torch.Generator().manual_seed(seed)
    extras = {}
    for key, tensor in time_keys.items():
        target = prefix + key.split(".timestep_embedder.", 1)[1]
        fan_in = tensor.shape[-1] if tensor.dim() == 2 else 4.0
        extras[target] = torch.randn(tensor.shape, generator=gen) / fan_in ** 0.5
    save_file(extras, hf / hf_io.EXTRAS_NAME, metadata={"format": "pt"})
    return hf


def _ours(checkpoint):
    from megatron_apex.inference.loading import load_model_for_inference

    return load_model_for_inference(str(checkpoint))[0]


# ----------------------------------------------------------------------------- Qwen-Image
@pytest.fixture(scope="module")
def qwen_export(tmp_path_factory, qwen_base):  # noqa: F811
    root = tmp_path_factory.mktemp("qwen_apex")
    hf = with_trained_embedder(QWEN_IMAGE.save_diffusers(root / "hf", seed=3), "time_text_embed_2.timestep_embedder.",
                               seed=4)
    assert convert("import", "--hf-path", hf, "--save", root / "ckpt") == 0
    assert convert("export", "--load", root / "ckpt", "--hf-path", root / "pipeline",
                              "--base-pipeline", qwen_base) == 0
    return root / "ckpt", root / "pipeline"


def qwen_inputs(b=2, h=6, w=8, L=5):
    gen = torch.Generator().manual_seed(21)
    noise = torch.randn(b, QWEN_IMAGE.arch["out_channels"], h, w, generator=gen)
    ctx = torch.randn(b, L, QWEN_IMAGE.context_width, generator=gen)
    mask = torch.ones(b, L)
    mask[1, 3:] = 0
    return noise, ctx, mask


def qwen_pipeline_latents(pipe, noise, ctx, mask, steps, method="flowmap", seed=5, pass_noise=True, **kw):
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    _, _, h, w = noise.shape
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt_embeds=ctx, prompt_embeds_mask=mask, height=h * pipe.vae_scale_factor,
                width=w * pipe.vae_scale_factor, num_inference_steps=steps, output_type="latent", return_dict=False)
    if pass_noise:
        args["latents"] = pack_latents(noise, 2)
    if isinstance(pipe, ApexQwenImagePipeline):
        args.update(method=method, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return unpack_latents(pipe(**args, **kw)[0], h, w, 2)


def test_qwen_image_export_loads_through_diffusion_pipeline_and_takes_our_steps(qwen_export):
    from diffusers import DiffusionPipeline

    from megatron_apex.inference.samplers import sample

    ckpt, out = qwen_export
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ApexQwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]  # stock loaders keep working

    pipe = DiffusionPipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    assert type(pipe) is ApexQwenImagePipeline and type(pipe.transformer) is ApexQwenImageTransformer2DModel
    model = _ours(ckpt)
    noise, ctx, mask = qwen_inputs()
    for steps, method in RUNS:
        theirs = qwen_pipeline_latents(pipe, noise, ctx, mask, steps, method)
        ours = sample(model, noise, ctx, mask, nfe=steps, method=method, generator=torch.Generator().manual_seed(5))
        assert (theirs - noise).abs().max() > 0.1, (steps, method)  # the sampler moved the latents
        assert (ours - theirs).abs().max().item() <= TOL, (steps, method)


def test_qwen_image_pipeline_noise_from_a_seed_is_tools_sample_noise(qwen_export):
    """No latents given: the pipeline draws the noise (and the release sampler's fresh noise)
    from its CPU generator as samplers.sample_seeded (tools/sample.py) does from --seed."""
    from megatron_apex.inference.samplers import sample_seeded

    ckpt, out = qwen_export
    pipe = ApexQwenImagePipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    model = _ours(ckpt)
    noise, ctx, mask = qwen_inputs()
    for steps, method in ((1, "flowmap"), (4, "release")):
        theirs = qwen_pipeline_latents(pipe, noise, ctx, mask, steps, method, seed=13, pass_noise=False)
        ours = sample_seeded(model, ctx, mask, tuple(noise.shape[1:]), nfe=steps, method=method, seed=13)
        assert (ours - theirs).abs().max().item() <= TOL, (steps, method)


def test_stock_qwen_image_classes_load_the_export_and_take_the_velocity_heads_euler_step(qwen_export):
    """What the stock classes cost: the trained jump is lost, the one step is Euler on F(z, 1, c)."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from megatron_apex.inference.samplers import sample

    ckpt, out = qwen_export
    stock = QwenImagePipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    assert type(stock) is QwenImagePipeline and type(stock.transformer) is QwenImageTransformer2DModel
    assert type(QwenImageTransformer2DModel.from_pretrained(out / "transformer")) is QwenImageTransformer2DModel
    model = _ours(ckpt)
    noise, ctx, mask = qwen_inputs()
    theirs = qwen_pipeline_latents(stock, noise, ctx, mask, 1)
    euler = sample(model, noise, ctx, mask, nfe=1, method="euler")
    jump = sample(model, noise, ctx, mask, nfe=1, method="flowmap")
    assert (theirs - euler).abs().max().item() <= TOL
    assert (jump - euler).abs().max().item() > 0.5  # a trained embedder matters: ignoring it is far off


def test_a_fresh_process_needs_the_import_for_the_apex_class_but_not_for_the_stock_one(qwen_export):
    _, out = qwen_export
    script = f"""
import sys
from diffusers import DiffusionPipeline, QwenImagePipeline
try:
    DiffusionPipeline.from_pretrained({str(out)!r}, vae=None, text_encoder=None, tokenizer=None)
    print("loaded without the import")
except AttributeError as err:
    print("refused:", err)
pipe = QwenImagePipeline.from_pretrained({str(out)!r}, vae=None, text_encoder=None, tokenizer=None)
print("stock:", type(pipe.transformer).__name__, any(m.startswith("megatron_apex") for m in sys.modules))
import megatron_apex.inference.diffusers_apex
pipe = DiffusionPipeline.from_pretrained({str(out)!r}, vae=None, text_encoder=None, tokenizer=None)
print("apex:", type(pipe).__name__, type(pipe.transformer).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith(("refused", "loaded", "stock", "apex"))]
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines[0].startswith("refused:") and "ApexQwenImagePipeline" in lines[0], lines
    assert lines[1] == "stock: QwenImageTransformer2DModel False", lines
    assert lines[2] == "apex: ApexQwenImagePipeline ApexQwenImageTransformer2DModel", lines


@pytest.mark.parametrize("extras", ["separate", "drop"])
def test_extras_in_a_side_file_load_and_dropped_extras_give_the_stock_pipeline(qwen_export, qwen_base, tmp_path,  # noqa: F811
                                                                               extras):
    from megatron_apex.inference.samplers import sample

    ckpt, _ = qwen_export
    out = tmp_path / "pipeline"
    assert convert("export", "--load", ckpt, "--hf-path", out, "--base-pipeline", qwen_base,
                              "--extras", extras) == 0
    index = json.loads((out / "model_index.json").read_text())
    transformer = ApexQwenImageTransformer2DModel.from_pretrained(out / "transformer")
    noise, ctx, mask = qwen_inputs()
    model = _ours(ckpt)
    if extras == "drop":
        assert index["_class_name"] == "QwenImagePipeline" and not transformer.has_target_time_embedder
        with pytest.raises(ValueError, match="target_timestep differs from timestep but this "
                                             "ApexQwenImageTransformer2DModel has no target-time embedder"):
            qwen_pipeline_latents(ApexQwenImagePipeline.from_pretrained(out, vae=None, text_encoder=None,
                                                                        tokenizer=None), noise, ctx, mask, 1)
        return
    assert index["_class_name"] == "ApexQwenImagePipeline" and transformer.has_target_time_embedder
    assert set(load_file(out / "transformer" / hf_io.EXTRAS_NAME)) >= {
        "time_text_embed_2.timestep_embedder.linear_2.weight"}
    pipe = ApexQwenImagePipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    for steps in (1, 4):
        ours = sample(model, noise, ctx, mask, nfe=steps)
        assert (qwen_pipeline_latents(pipe, noise, ctx, mask, steps) - ours).abs().max().item() <= TOL


def test_a_checkpoint_without_the_embedder_keeps_the_stock_pipeline_class(qwen_base, tmp_path):  # noqa: F811
    hf = QWEN_IMAGE.save_diffusers(tmp_path / "hf", seed=3)
    assert convert("import", "--hf-path", hf, "--save", tmp_path / "ckpt",
                              "--target-time-embedder", "none") == 0
    assert convert("export", "--load", tmp_path / "ckpt", "--hf-path", tmp_path / "out",
                              "--base-pipeline", qwen_base) == 0
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"


def test_the_apex_transformer_without_target_timestep_is_the_stock_class(qwen_export):
    from diffusers import QwenImageTransformer2DModel

    from megatron_apex.models.qwen_image.model import pack_latents

    _, out = qwen_export
    apex = ApexQwenImageTransformer2DModel.from_pretrained(out / "transformer").eval()
    stock = QwenImageTransformer2DModel.from_pretrained(out / "transformer").eval()
    noise, ctx, mask = qwen_inputs()
    common = dict(hidden_states=pack_latents(noise, 2), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
                  timestep=torch.tensor([1.0, 0.4]), img_shapes=[(1, 3, 4)] * 2, return_dict=False)
    with torch.no_grad():
        ref = stock(**common)[0]
        assert torch.equal(apex(**common)[0], ref)
        assert torch.equal(apex(**common, target_timestep=torch.tensor([1.0, 0.4]))[0], ref)
        assert (apex(**common, target_timestep=torch.zeros(2))[0] - ref).abs().max() > 0.1


def test_apex_pipeline_errors_are_one_line(qwen_export):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, out = qwen_export
    noise, ctx, mask = qwen_inputs()
    stock = QWEN_IMAGE.random_diffusers(seed=1)
    pipe = ApexQwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, transformer=stock)
    with pytest.raises(ValueError, match="ApexQwenImagePipeline needs an ApexQwenImageTransformer2DModel, got "
                                         "QwenImageTransformer2DModel"):
        qwen_pipeline_latents(pipe, noise, ctx, mask, 1)
    pipe = ApexQwenImagePipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    with pytest.raises(ValueError, match="method='heun'; choose one of euler, flowmap, renoise, release"):
        qwen_pipeline_latents(pipe, noise, ctx, mask, 1, method="heun")
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        qwen_pipeline_latents(pipe, noise, ctx, mask, 0)
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        pipe(prompt_embeds=ctx, prompt_embeds_mask=mask, height=48, width=64, output_type="latent",
             generator=SimpleNamespace(device=torch.device("cuda")))  # a CUDA generator, without a GPU
    with pytest.raises(ValueError, match="not a local folder"):
        ApexQwenImageTransformer2DModel.from_pretrained("someone/some-model")


def test_the_export_names_the_pipelines_this_module_registers():
    import diffusers

    from megatron_apex.conversion import pipeline_io
    from megatron_apex.inference.diffusers_apex import PIPELINES

    assert {stock: cls.__name__ for stock, cls in PIPELINES.items()} == pipeline_io.APEX_PIPELINES
    assert all(getattr(diffusers, cls.__name__) is cls for cls in PIPELINES.values())


# ----------------------------------------------------------------------------- Sana
@pytest.fixture(scope="module")
def sana_export(tmp_path_factory):
    """A complete SanaPipeline (tokenizer, Gemma-2, DC-AE) as the base of an export of a
    checkpoint with a trained target-time embedder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    root = tmp_path_factory.mktemp("sana_apex")
    arch = SANA.arch
    hf = with_trained_embedder(SANA.save_diffusers(root / "hf", seed=3), "time_embed_2.emb.timestep_embedder.",
                               seed=4)
    assert convert("import", "--hf-path", hf, "--save", root / "ckpt") == 0
    tokenizer, encoder = tiny_text_stack(arch["caption_channels"])
    SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_dc_ae(arch["in_channels"]),
                 transformer=SANA.random_diffusers(seed=11),
                 scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(root / "base")
    assert convert("export", "--load", root / "ckpt", "--hf-path", root / "pipeline",
                              "--base-pipeline", root / "base") == 0
    return root / "ckpt", root / "pipeline"



def sana_pipeline_latents(pipe, noise, steps, method="flowmap", seed=5, **kw):
    pipe.set_progress_bar_config(disable=True)
    _, _, h, w = noise.shape
    args = dict(prompt=SANA_PROMPTS, height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor,
                num_inference_steps=steps, latents=noise, use_resolution_binning=False,
                complex_human_instruction=None, max_sequence_length=8, output_type="latent", return_dict=False)
    if isinstance(pipe, ApexSanaPipeline):
        args.update(method=method, generator=torch.Generator().manual_seed(seed))
    else:
        args.update(guidance_scale=1.0)
    with torch.no_grad():
        return pipe(**args, **kw)[0]


def test_sana_export_loads_through_diffusion_pipeline_and_takes_our_steps(sana_export):
    from diffusers import DiffusionPipeline, SanaPipeline, SanaTransformer2DModel

    from megatron_apex.inference.samplers import sample

    ckpt, out = sana_export
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "ApexSanaPipeline"
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is ApexSanaPipeline and type(pipe.transformer) is ApexSanaTransformer2DModel
    # one step, and the pipeline's VAE decodes it as it decodes ours (test_convert_hf's Sana pipeline check)
    assert_sana_pipeline_matches_our_one_step(pipe, str(ckpt))

    model = _ours(ckpt)
    noise = torch.randn(2, SANA.arch["in_channels"], 32, 16, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        ctx, mask, _, _ = pipe.encode_prompt(SANA_PROMPTS, do_classifier_free_guidance=False, max_sequence_length=8,
                                             complex_human_instruction=None)
    for steps, method in RUNS:
        theirs = sana_pipeline_latents(pipe, noise, steps, method)
        ours = sample(model, noise, ctx, mask, nfe=steps, method=method, generator=torch.Generator().manual_seed(5))
        assert (ours - theirs).abs().max().item() <= TOL, (steps, method)

    stock = SanaPipeline.from_pretrained(out)
    assert type(stock.transformer) is SanaTransformer2DModel
    euler = sample(model, noise, ctx, mask, nfe=1, method="euler")
    assert (sana_pipeline_latents(stock, noise, 1) - euler).abs().max().item() <= TOL
    assert (sample(model, noise, ctx, mask, nfe=1) - euler).abs().max().item() > 0.5


def test_sana_guidance_is_the_samplers_guidance(sana_export):
    """guidance_scale != 1: the unconditional states of the negative prompt, combined as
    samplers.sample combines them (tools/sample.py's --guidance-scale)."""
    from megatron_apex.inference.samplers import sample

    ckpt, out = sana_export
    pipe = ApexSanaPipeline.from_pretrained(out)
    noise = torch.randn(2, SANA.arch["in_channels"], 32, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ctx, mask, uncond, uncond_mask = pipe.encode_prompt(SANA_PROMPTS, do_classifier_free_guidance=True,
                                                            negative_prompt="", max_sequence_length=8,
                                                            complex_human_instruction=None)
    model = _ours(ckpt)
    ours = sample(model, noise, ctx, mask, nfe=2, guidance_scale=3.0, uncond_context=uncond, uncond_mask=uncond_mask)
    theirs = sana_pipeline_latents(pipe, noise, 2, guidance_scale=3.0)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (theirs - sana_pipeline_latents(pipe, noise, 2)).abs().max() > 0.1
    with pytest.raises(ValueError, match="no resolution bins for sample_size 8; pass use_resolution_binning=False"):
        pipe(prompt=SANA_PROMPTS, height=64, width=32, output_type="latent")
