"""LoRA in the trainer and the tools, in one process: the frozen base stays bit-identical
through training and is all that is absent from a LoRA checkpoint; resuming reads the base from
the checkpoint (refusals of another rank, model or base, and tools/export_lora.py's bad input:
tests/unit/test_bad_inputs.py); sampling-side loading rebuilds base + adapters; tools/export_lora.py writes a diffusers LoRA file that our
own importer reads back to the same model and refuses for another rank; the
``--lora-fake-reference base`` routing against adapters_disabled computed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_apex.conversion.lora_diffusers import LORA_WEIGHT_NAME, load_diffusers_lora
from megatron_apex.lora import LoRAConfig, adapters_disabled, apply_lora
from megatron_apex.training.arguments import parse_args

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--model", "qwen-image-tiny", "--num-layers", "2", "--micro-batch-size", "4", "--global-batch-size", "4",
          "--log-interval", "1", "--no-progress", "--seed", "7", "--apex-variant", "released",
          "--apex-option", "dm_warmup_steps=0"]
LORA = ["--lora-rank", "4", "--lora-targets", "attn,img_in", "--lr", "1e-2"]


def _write_dataset(path):
    """16 samples of 1 x 8 x 8 images with 1-4 text tokens of width 384 (the MiniLM width)."""
    from megatron_apex.data.shard_writer import SHARD_FORMAT, write_manifest, write_split

    rng = np.random.default_rng(0)

    def samples():
        for i in range(16):
            n = int(rng.integers(1, 5))
            yield dict(key=f"{i:07d}", image=rng.integers(0, 256, (1, 8, 8), dtype=np.uint8),
                       context=rng.standard_normal((n, 384)).astype(np.float16), mask=np.ones(n, bool),
                       caption=f"caption {i}", label=i % 4)

    write_manifest(path, dict(format=SHARD_FORMAT, splits={"train": write_split(path, "train", samples(), 16)},
                              context_dim=384, max_text_len=4))


def _trainer(root: Path, *argv):
    from megatron_apex.training.loop import Trainer

    return Trainer(parse_args([*COMMON, "--data-path", str(root / "data"), *argv]))


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two full-parameter bases (seeds 7 and 8; 2 iterations so the zero-initialised output
    head has moved), and a LoRA run of 3 iterations on the first, checkpointed at 3."""
    root = tmp_path_factory.mktemp("lora_cli")
    _write_dataset(root / "data")
    for name, seed in (("base", "7"), ("other_base", "8")):
        _trainer(root, "--train-iters", "2", "--lr", "1e-2", "--seed", seed, "--save", str(root / name)).train()
    trainer = _trainer(root, *LORA, "--train-iters", "3", "--ema-decay", "0.5", "--save", str(root / "lora"),
                       "--pretrained-checkpoint", str(root / "base"))
    before = _frozen(trainer.model)
    trainer.train()
    return root, trainer, before


def test_base_bit_identical_and_checkpoint_holds_only_the_trainable(runs):
    from megatron.core import dist_checkpointing

    root, trainer, before = runs
    after = _frozen(trainer.model)
    assert sorted(after) == sorted(before) and len(after) > 20
    assert all(torch.equal(after[n], before[n]) for n in before)
    # ... and equal to the base checkpoint's weights as saved (read back by the inference loader)
    from megatron_apex.inference.loading import load_lora_base

    state = json.loads((root / "lora" / "iter_0000003" / "train_state.json").read_text())
    saved_base, _ = load_lora_base(str(root / "lora"), state)
    saved = dict(saved_base.named_parameters())
    assert all(torch.equal(saved[n], after[n]) for n in after)
    base = trainer.model
    # the adapters trained
    b = {n: p for n, p in base.named_parameters() if n.endswith("lora_B")}
    still_zero = [n for n, p in b.items() if p.abs().max() == 0]
    # the text stream's attention output passes the text adaLN gate, still zero in this barely trained base
    assert len(b) == 9 and all(".linear_added_proj." in n for n in still_zero), still_zero
    keys = dist_checkpointing.load_tensors_metadata(str(root / "lora" / "iter_0000003")).keys()
    weights = sorted(k for k in keys if k.startswith(("model.", "ema.")))
    trainable = sorted(n for n, p in base.named_parameters() if p.requires_grad)
    assert weights == sorted([f"model.{n}" for n in trainable] + [f"ema.{n}" for n in trainable])
    assert state["lora"]["base"] == str(root / "base" / "iter_0000002")
    assert state["lora"]["config"] == LoRAConfig(rank=4, targets="attn,img_in").to_dict()


def test_inference_loading_rebuilds_base_and_adapters(runs):
    from megatron_apex.inference.loading import load_model_for_inference

    root, trainer, _ = runs
    for weights, source in (("model", trainer.model), ("ema", trainer.ema)):
        model, state = load_model_for_inference(str(root / "lora"), weights)
        assert state["lora_base"] == str(root / "base" / "iter_0000002")
        ours = dict(model.named_parameters())
        for name, p in source.named_parameters():
            assert torch.equal(ours[name], p), (weights, name)
    # EMA decay 0.5 over 3 steps: the EMA adapters are not the model's
    assert not torch.equal(trainer.ema.layers[0].attention.linear_qkv.lora_B,
                           trainer.model.layers[0].attention.linear_qkv.lora_B)
    with pytest.raises(ValueError, match=r"trained on a different base model: .* differs .*give the right one "
                                         r"with --pretrained-checkpoint"):
        load_model_for_inference(str(root / "lora"), "model", str(root / "other_base"))


def test_resume_without_the_base_path_reads_it_from_the_checkpoint(runs):
    root, trainer, _ = runs
    resumed = _trainer(root, *LORA, "--train-iters", "4", "--ema-decay", "0.5", "--load", str(root / "lora"))
    assert resumed.iteration == 3 and resumed.strategy.lora_base == str(root / "base" / "iter_0000002")
    ours = dict(resumed.model.named_parameters())
    assert all(torch.equal(ours[n], p) for n, p in trainer.model.named_parameters())


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_lora", REPO / "tools" / "export_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_lora_file_reads_back_and_refuses_another_rank(runs, tmp_path, capsys):
    from megatron_apex.inference.loading import load_lora_base

    root, trainer, _ = runs
    tool = _export_tool()
    out = tmp_path / "lora_out"
    assert tool.main(["--load", str(root / "lora"), "--weights", "model", "--out", str(out)]) == 0
    # the trained target-time embedder goes beside the LoRA file by default
    assert "beside it in apex_extras.safetensors" in capsys.readouterr().out
    info = json.loads((out / "megatron_apex_lora.json").read_text())
    assert info["base"] == str(root / "base" / "iter_0000002") and info["iteration"] == 3
    assert info["extras_beside"] == [n for n, p in trainer.model.named_parameters()
                                     if n.startswith("target_time_embedder")] and info["dropped_extras"] == []
    assert tool.main(["--load", str(root / "lora"), "--weights", "model", "--out", str(tmp_path / "drop"),
                      "--extras", "drop"]) == 0
    assert "left out (no place in a LoRA file): target_time_embedder" in capsys.readouterr().out
    assert not (tmp_path / "drop" / "apex_extras.safetensors").exists()

    state = json.loads((root / "lora" / "iter_0000003" / "train_state.json").read_text())
    model, _ = load_lora_base(str(root / "lora"), state)
    apply_lora(model, LoRAConfig(rank=4, targets="attn,img_in", init_seed=3))
    load_diffusers_lora(model, str(out))
    ours = dict(model.named_parameters())
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(ours[name], p, rtol=1e-6, atol=1e-7), name

    other_rank, _ = load_lora_base(str(root / "lora"), state)
    apply_lora(other_rank, LoRAConfig(rank=8, targets="attn,img_in"))
    with pytest.raises(ValueError, match=r"has shape \[4, \d+\], the adapter on .* expects \[8, \d+\] \(model "
                                         r"adapter rank 8; a different rank or another model\?\)"):
        load_diffusers_lora(other_rank, str(out / LORA_WEIGHT_NAME))


def test_exported_lora_in_the_apex_pipeline_takes_the_lora_runs_steps(runs, tmp_path, capsys):
    """tools/export_lora.py's default export, loaded with load_lora_weights into the APEX
    pipeline around the base's export, samples as tools/sample.py's sampler on the LoRA run."""
    pytest.importorskip("peft")
    from diffusers import FlowMatchEulerDiscreteScheduler

    from megatron_apex.inference.diffusers_apex import ApexQwenImagePipeline, ApexQwenImageTransformer2DModel
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    root, _, _ = runs
    convert = importlib.util.spec_from_file_location("convert_hf", REPO / "tools" / "convert_hf.py")
    convert_tool = importlib.util.module_from_spec(convert)
    convert.loader.exec_module(convert_tool)
    assert convert_tool.main(["export", "--load", str(root / "base"), "--hf-path", str(tmp_path / "base")]) == 0
    assert _export_tool().main(["--load", str(root / "lora"), "--weights", "model", "--out", str(tmp_path / "lora")]) == 0
    capsys.readouterr()
    pipe = ApexQwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None,
                                 transformer=ApexQwenImageTransformer2DModel.from_pretrained(tmp_path / "base"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    model, _ = load_model_for_inference(str(root / "lora"), "model")
    gen = torch.Generator().manual_seed(3)
    noise, ctx = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 4, 384, generator=gen)
    mask = torch.ones(2, 4)
    mask[1, 2:] = 0
    for steps in (1, 4):
        with torch.no_grad():
            theirs = pipe(prompt_embeds=ctx, prompt_embeds_mask=mask, latents=pack_latents(noise, 4), height=64,
                          width=64, num_inference_steps=steps, output_type="latent", return_dict=False)[0]
        ours = sample(model, noise, ctx, mask, nfe=steps)
        assert (unpack_latents(theirs, 8, 8, 4) - ours).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------- fake reference
def test_base_fake_reference_routes_no_grad_fake_rows_to_the_base():
    from megatron_apex.lora.fake_reference import BaseFakeReference, BaseModel, route_fake_queries_to_base
    from megatron_apex.families import build_model, get_model_config
    from megatron_apex.objectives.apex import APEXConfig, two_phase_apex
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)
    torch.manual_seed(0)
    config = get_model_config("qwen-image-tiny-test", shift_kind="full")
    from megatron_apex.conversion.random_weights import randomize_weights_

    model = randomize_weights_(build_model(config, backend="local").eval(), 1)  # adaLN-Zero: blocks = identity
    apply_lora(model, LoRAConfig(rank=2, targets="attn"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 4, 4, generator=g), torch.rand(4, generator=g)
    ctx, mask = torch.randn(4, 3, config.joint_attention_dim, generator=g), torch.ones(4, 3)
    fake = torch.tensor([True, False, True, False])
    wrapped = BaseFakeReference(model)
    with torch.no_grad():
        adapted = model(x, t, ctx, mask, fake_condition=fake)
        with adapters_disabled(model):
            base = model(x, t, ctx, mask, fake_condition=fake)
        assert (adapted - base).abs().max() > 1e-3
        mixed = wrapped(x, t, ctx, mask, fake_condition=fake)
        torch.testing.assert_close(mixed[fake], base[fake], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mixed[~fake], adapted[~fake], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(wrapped(x, t, ctx, mask, fake_condition=True),
                                   BaseModel(model)(x, t, ctx, mask, fake_condition=True), rtol=0, atol=0)
        assert torch.equal(wrapped(x, t, ctx, mask), model(x, t, ctx, mask))
    with_grad = wrapped(x, t, ctx, mask, fake_condition=True)  # queries with a gradient: the adapted model
    assert with_grad.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(with_grad.detach(), model(x, t, ctx, mask, fake_condition=True), rtol=0, atol=0)

    # two-phase: the fake-condition no-grad queries go to the teacher slot, the rest stay
    paper = route_fake_queries_to_base(two_phase_apex(x, torch.randn_like(x), t, ctx, mask, APEXConfig()))
    assert [(q.fake_condition, q.teacher) for q in paper.nograd_queries(0)] == [(False, False), (True, True)]
    released = two_phase_apex(x, torch.randn_like(x), t, ctx, mask, APEXConfig(variant="released"),
                              generator=torch.Generator().manual_seed(0), teacher=True)
    routed = route_fake_queries_to_base(released)
    routed.receive(0, [torch.zeros_like(x)])
    with pytest.raises(ValueError, match="cannot run with a frozen teacher in the two-phase step"):
        routed.nograd_queries(1)


def test_base_fake_reference_with_frozen_teacher_two_phase_refused_at_start():
    from megatron_apex.objectives.apex import APEXConfig
    from megatron_apex.training.validation import check_lora_config

    cfg = parse_args([*COMMON, *LORA, "--lora-fake-reference", "base", "--apex-schedule", "two-phase"])
    with pytest.raises(ValueError, match="--lora-fake-reference base cannot run with --teacher frozen in the "
                                         "two-phase step"):
        check_lora_config(cfg, True, APEXConfig(variant="released"))
    check_lora_config(cfg, False, APEXConfig(variant="released"))  # the direct step can
    check_lora_config(cfg, True, APEXConfig(variant="paper"))  # the paper variant has no teacher
