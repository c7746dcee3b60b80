"""docs/walkthrough.md rehearsed on the CPU with tiny random parts, every step through the
command a cluster user types:

a diffusers pipeline folder (Qwen-Image layout: transformer/, vae/, text_encoder/, tokenizer/)
-> `tools/convert_hf.py import` -> `tools/prepare_data.py` on PNG + caption files with that
pipeline's VAE and text encoder -> the full-parameter recipe at `--tiny` size on that data from
that base -> killed -> run again (resumes) -> `tools/convert_hf.py export --base-pipeline` ->
`DiffusionPipeline.from_pretrained` -> one-step images equal to `tools/sample.py`'s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import REPO, child_env
from dist_utils import free_port
from test_recipe_resume import kill_the_node
from tiny_encoders import tiny_text_encoder
from tiny_vaes import tiny_vae

pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through /proc")

RECIPE = "examples/recipes/qwen_image_20b_full.sh"
CAPTIONS = ["a red square on grey", "a blue circle", "green stripes", "a yellow dot in a corner",
            "two white bars", "a black cross", "a purple ring", "an orange triangle"]
SIDE = 56  # pixels: the tiny VAE halves it, qwen-image-tiny's patches of 4 make a 7 x 7 token grid


def run(*argv, **env):
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                          env={**child_env(), **env}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def pipeline_folder(root):
    """What a user downloads: a Qwen-Image pipeline folder, here of tiny random parts that fit
    qwen-image-tiny (384-wide text states, one latent channel)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    from megatron_apex.families import get_model_config, qwen_image

    text_encoder, tokenizer = tiny_text_encoder("qwen2_5_vl", root / "te", CAPTIONS, hidden_size=384)
    arch = dict(qwen_image.config_to_diffusers(get_model_config("qwen-image-tiny")))
    arch.pop("_class_name")
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**arch).eval()
    with torch.no_grad():  # diffusers zero-initialises the output layers: give the base a real velocity
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                             vae=tiny_vae("AutoencoderKLQwenImage", image_channels=3, latent_channels=1).eval(),
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def images_with_captions(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


def recipe(base, save, data, **popen):
    env = {**child_env(), "PYTHON": sys.executable, "BASE": str(base), "SAVE": str(save), "DATA_PATH": str(data),
           "MASTER_PORT": str(free_port())}
    return subprocess.Popen(["bash", RECIPE, "--tiny", "--no-progress"], env=env, cwd=REPO, start_new_session=True,
                            **popen)


def test_the_walkthrough_on_tiny_parts(tmp_path):
    from diffusers import DiffusionPipeline

    import megatron_apex.inference.diffusers_apex  # noqa: F401  (registers the APEX pipelines)

    hub = pipeline_folder(tmp_path / "hub")
    base, data, save, export = tmp_path / "base", tmp_path / "data", tmp_path / "run", tmp_path / "export"

    # 1. import the transformer
    run("tools/convert_hf.py", "import", "--hf-path", hub / "transformer", "--save", base, "--no-progress")

    # 2. prepare the data with the pipeline's own VAE and text encoder (its tokenizer is beside it)
    run("tools/prepare_data.py", "--input", images_with_captions(tmp_path / "images"), "--output", data,
        "--vae", hub / "vae", "--text-encoder", hub / "text_encoder", "--resolution", SIDE, "--patch-size", 4,
        "--max-text-len", 16, "--samples-per-shard", 4, "--no-progress")

    # 3. the recipe, killed once a checkpoint is published, then run again: it resumes
    first = recipe(base, save, data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (save / "iter_0000004" / "train_state.json").is_file():
        assert first.poll() is None, "the recipe ended before its second checkpoint"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    kill_the_node(first.pid)
    first.wait()
    second = recipe(base, save, data, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    assert "resumed from" in out and "iter_000000" in out, out[-3000:]
    assert (save / "iter_0000008" / "train_state.json").is_file()

    # 4. export into a pipeline folder around the base's other components (float32: the CPU
    # samples a bf16 run's checkpoint in float32, and the comparison below is exact)
    run("tools/convert_hf.py", "export", "--load", save, "--hf-path", export, "--base-pipeline", hub,
        "--dtype", "float32", "--no-progress")

    # 5. one step in diffusers equals tools/sample.py's one step
    prompts = CAPTIONS[:2]
    out_prefix = tmp_path / "samples" / "nfe1"
    run("tools/sample.py", "--load", save, "--pipeline", hub, "--prompt", prompts[0], "--prompt", prompts[1],
        "--height", SIDE, "--width", SIDE, "--nfe", 1, "--num-per-prompt", 1, "--seed", 3, "--out", out_prefix)
    ours = np.load(f"{out_prefix}.npz")["images"]

    pipe = DiffusionPipeline.from_pretrained(export)
    assert type(pipe).__name__ == "ApexQwenImagePipeline"
    # the template's system tokens, counted with the tiny tokenizer (Qwen2's tokenizer has 34)
    from megatron_apex.data.encoders import TransformersTextEncoder

    pipe.prompt_template_encode_start_idx = TransformersTextEncoder(str(hub / "text_encoder")).drop
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, height=SIDE, width=SIDE, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(3), output_type="np", max_sequence_length=16).images
    theirs = np.round(np.clip(theirs, 0, 1) * 255).astype(np.uint8)
    assert ours.shape == theirs.shape == (2, SIDE, SIDE, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert np.abs(ours[0].astype(int) - ours[1].astype(int)).mean() > 1  # two prompts, two different images
