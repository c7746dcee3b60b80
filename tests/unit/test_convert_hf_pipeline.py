"""`convert_hf.py export --base-pipeline`: a whole diffusers pipeline folder (the base's other
components, copied, and our transformer/) that diffusers' own ``from_pretrained`` loads and
that takes the same NFE = 1 step as our sampler on the checkpoint; bad bases fail in one line
and leave nothing behind."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from family_cases import QWEN_IMAGE, SANA, TOL, assert_sana_pipeline_matches_our_one_step, convert  # noqa: E402
from family_cases import tiny_dc_ae, tiny_text_stack  # noqa: E402


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _expect_base_untouched_and_copied(base, out):
    """Every base file but transformer/ is in out with the same bytes, as a file of its own (no
    shared inode, no link); transformer/ is ours; model_index.json is the base's but for the
    pipeline class: the APEX one of the base's, as the checkpoint has a target-time embedder."""
    base_files = [f for f in _files(base) if not f.startswith("transformer" + os.sep)]
    ours = _files(out)
    assert [f for f in ours if not f.startswith("transformer" + os.sep)] == base_files
    for f in base_files:
        if f != "model_index.json":
            assert (base / f).read_bytes() == (out / f).read_bytes(), f
            assert os.stat(base / f).st_ino != os.stat(out / f).st_ino and not os.path.islink(out / f), f
    base_index = json.loads((base / "model_index.json").read_text())
    assert json.loads((out / "model_index.json").read_text()) == {**base_index,
                                                                  "_class_name": "Apex" + base_index["_class_name"]}
    assert "transformer/megatron_apex_config.json" in ours
    assert not (base / "transformer" / "megatron_apex_config.json").exists()


@pytest.fixture(scope="module")
def qwen_imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    hf = QWEN_IMAGE.save_diffusers(root / "hf", seed=3)
    assert convert("import", "--hf-path", hf, "--save", root / "ckpt") == 0
    return root / "ckpt"


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    """A saved QwenImagePipeline (offline: no VAE or text encoder needed for latent output with
    prompt_embeds) whose transformer is another random model, so a leftover would show."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    # the same scheduler as test_convert_hf's Qwen-Image pipeline test (one step goes sigma 1 -> 0)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                             text_encoder=None, tokenizer=None, transformer=QWEN_IMAGE.random_diffusers(seed=11))
    base = tmp_path_factory.mktemp("qwen_base") / "pipeline"
    pipe.save_pretrained(base)
    return base


def test_qwen_image_pipeline_from_exported_folder_takes_our_one_step(qwen_imported, qwen_base, tmp_path, capsys):
    from diffusers import QwenImagePipeline

    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample

    out = tmp_path / "pipeline"
    assert convert("export", "--load", qwen_imported, "--hf-path", out, "--base-pipeline", qwen_base) == 0
    assert "files copied" in capsys.readouterr().out
    _expect_base_untouched_and_copied(qwen_base, out)

    pipe = QwenImagePipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    base_pipe = QwenImagePipeline.from_pretrained(qwen_base, vae=None, text_encoder=None, tokenizer=None)
    assert type(pipe.scheduler) is type(base_pipe.scheduler) and pipe.scheduler.config == base_pipe.scheduler.config

    noise, ctx, mask = QWEN_IMAGE.pipeline_inputs()

    def one_step(p):
        return QWEN_IMAGE.pipeline_latents(p, noise, ctx, mask, 1)

    theirs = one_step(pipe)
    model, _ = load_model_for_inference(str(qwen_imported))
    ours = sample(model, noise, ctx, mask, nfe=1, method="euler")
    assert (theirs - noise).abs().max() > 0.1  # the step moved the latents
    assert (ours - theirs).abs().max().item() <= TOL
    base_pipe.set_progress_bar_config(disable=True)
    assert (one_step(base_pipe) - theirs).abs().max() > 0.1  # the base's own transformer was replaced


def test_sana_pipeline_with_text_encoder_and_vae_from_exported_folder(tmp_path, capsys):
    """A complete SanaPipeline (tokenizer, Gemma-2, DC-AE, scheduler) as the base: the exported
    pipeline encodes the prompts, steps and decodes as our sampler + the base's VAE do."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    arch = SANA.arch
    hf = SANA.save_diffusers(tmp_path / "hf", seed=3)
    assert convert("import", "--hf-path", hf, "--save", tmp_path / "ckpt") == 0
    tokenizer, encoder = tiny_text_stack(arch["caption_channels"])
    base = tmp_path / "base"
    SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_dc_ae(arch["in_channels"]),
                 transformer=SANA.random_diffusers(seed=11),
                 scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(base)

    out = tmp_path / "pipeline"
    assert convert("export", "--load", tmp_path / "ckpt", "--hf-path", out, "--base-pipeline", base) == 0
    capsys.readouterr()
    _expect_base_untouched_and_copied(base, out)

    assert_sana_pipeline_matches_our_one_step(SanaPipeline.from_pretrained(out), str(tmp_path / "ckpt"))


def test_bad_base_pipelines_fail_in_one_line_and_leave_nothing(qwen_imported, qwen_base, tmp_path, capsys):
    cases = {
        "model folder": (qwen_base / "transformer", "no model_index.json"),
        "missing": (tmp_path / "nowhere", "no such directory"),
    }
    sana_base = tmp_path / "sana_base"
    sana_base.mkdir()
    (sana_base / "model_index.json").write_text(json.dumps(
        {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    cases["other family"] = (sana_base, "'SanaTransformer2DModel'")
    wider = tmp_path / "wider_base"  # its VAE / text encoder expect another transformer interface
    (wider / "transformer").mkdir(parents=True)
    (wider / "model_index.json").write_bytes((qwen_base / "model_index.json").read_bytes())
    config = json.loads((qwen_base / "transformer" / "config.json").read_text())
    (wider / "transformer" / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 24}))
    cases["other interface"] = (wider, "joint_attention_dim 24")
    for name, (base, needle) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        assert convert("export", "--load", qwen_imported, "--hf-path", out, "--base-pipeline", base) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--base-pipeline" in err and needle in err, (name, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sana_base", "wider_base"]  # no temp folders left


def test_a_symlinked_base_like_the_hub_cache_gives_real_files(qwen_imported, qwen_base, tmp_path, capsys):
    """A Hugging Face cache snapshot (`<repo>/snapshots/<rev>`) is symlinks into the repo's
    blobs/: the output holds the blobs' data, never links back into the cache."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    for i, f in enumerate(_files(qwen_base)):
        (blobs / str(i)).write_bytes((qwen_base / f).read_bytes())
        (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / f).symlink_to(blobs / str(i))
    out = tmp_path / "pipeline"
    assert convert("export", "--load", qwen_imported, "--hf-path", out, "--base-pipeline", snapshot) == 0
    capsys.readouterr()
    for f in _files(out):
        assert not os.path.islink(out / f), f
    scheduler = "scheduler/scheduler_config.json"
    assert os.stat(out / scheduler).st_ino != os.stat(os.path.realpath(snapshot / scheduler)).st_ino
    assert (out / scheduler).read_bytes() == (qwen_base / scheduler).read_bytes()


@pytest.mark.parametrize("how", ["symlink out", "symlinked folder out", "hard link"])
def test_a_base_that_leads_outside_itself_is_refused_naming_the_file(qwen_imported, qwen_base, tmp_path, capsys,
                                                                     how):
    """A crafted base cannot copy a file of the machine into an export: a link out of the base,
    or a hard link (a second name of any file), is refused in one line naming it; nothing is
    written."""
    import shutil

    secret = tmp_path / "secret.txt"
    secret.write_text("not for export")
    base = tmp_path / "base"
    shutil.copytree(qwen_base, base)
    if how == "symlink out":
        victim = base / "scheduler" / "notes.txt"
        victim.symlink_to(secret)
    elif how == "symlinked folder out":
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("not for export")
        victim = base / "extra"
        victim.symlink_to(outside, target_is_directory=True)
    else:
        victim = base / "scheduler" / "notes.txt"
        os.link(secret, victim)
    out = tmp_path / "pipeline"
    assert convert("export", "--load", qwen_imported, "--hf-path", out, "--base-pipeline", base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(victim) in err and "--base-pipeline" in err, err
    assert not out.exists()


def test_a_symlink_inside_the_base_is_followed(qwen_imported, qwen_base, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(qwen_base, base)
    (base / "scheduler" / "alias.json").symlink_to(base / "scheduler" / "scheduler_config.json")
    out = tmp_path / "pipeline"
    assert convert("export", "--load", qwen_imported, "--hf-path", out, "--base-pipeline", base) == 0
    assert (out / "scheduler" / "alias.json").read_bytes() == (base / "scheduler" / "scheduler_config.json").read_bytes()
    assert not os.path.islink(out / "scheduler" / "alias.json")
