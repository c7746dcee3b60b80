"""Classifier-free guidance end to end: the empty prompt's states, caption dropout in the
trainer's batches, the CFG-enhanced APEX target through the trainer, and the guided sampler."""

import numpy as np
import pytest
import torch
from _toy_models import ToyVelocityModel, make_batch

from megatron_apex.data.empty_prompt import EMPTY_PROMPT_FILE, empty_prompt_context
from megatron_apex.inference.samplers import sample
from megatron_apex.training.arguments import parse_args

FLAGS = ["--model", "qwen-image-tiny", "--num-layers", "1", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--lr-warmup-iters", "0", "--log-interval", "100", "--no-progress", "--train-iters", "4"]


def _trainer(tmp_path, *extra):
    from megatron_apex.training.loop import Trainer

    return Trainer(parse_args([*FLAGS, "--save", str(tmp_path / "run"), *extra]))


# ---- the empty prompt ------------------------------------------------------------------------
def test_builtin_empty_prompt_is_minilm_of_the_empty_string_as_stored_captions_are():
    from megatron_apex.data.shards import load_dataset
    from megatron_apex.data.text_encoder import MiniLMTextEncoder

    manifest = load_dataset(None).manifest
    context, mask = empty_prompt_context(manifest, None, "--caption-dropout")
    states, ref_mask = MiniLMTextEncoder().encode([""], max_length=int(manifest["max_text_len"]))
    np.testing.assert_array_equal(mask, ref_mask[0])
    assert 0 < mask.sum() < len(mask)  # [CLS] [SEP], then padding
    np.testing.assert_array_equal(context, states[0].astype(np.float16).astype(np.float32))


def test_a_dataset_file_wins_and_a_dataset_without_one_is_refused(tmp_path):
    manifest = {"max_text_len": 5, "context_dim": 3, "text_encoder": {"kind": "hf", "name": "some/encoder"}}
    with pytest.raises(ValueError, match=f"--guidance-scale.*{EMPTY_PROMPT_FILE}.*prepare_data"):
        empty_prompt_context(manifest, str(tmp_path), "--guidance-scale")
    states = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    np.save(tmp_path / EMPTY_PROMPT_FILE, states.astype(np.float16))
    context, mask = empty_prompt_context(manifest, str(tmp_path), "--guidance-scale")
    assert mask.tolist() == [True, True, False, False, False]
    np.testing.assert_array_equal(context[:2], states.astype(np.float16).astype(np.float32))
    assert not context[2:].any()
    np.save(tmp_path / EMPTY_PROMPT_FILE, np.zeros((6, 3), dtype=np.float16))  # longer than max_text_len
    with pytest.raises(ValueError, match=EMPTY_PROMPT_FILE):
        empty_prompt_context(manifest, str(tmp_path), "--guidance-scale")


# ---- caption dropout -------------------------------------------------------------------------
def test_caption_dropout_replaces_the_drawn_rows_and_nothing_else(tmp_path):
    from megatron_apex.objectives.flow import sample_time
    from megatron_apex.training.random_streams import RandomPurpose, stream_generator

    p = 0.5
    plain, dropping = _trainer(tmp_path / "a"), _trainer(tmp_path / "b", "--caption-dropout", str(p))
    indices = list(range(8))
    for iteration in (0, 3):
        plain.iteration = dropping.iteration = iteration
        ref, got = plain.micro_batches(indices), dropping.micro_batches(indices)
        # the draw the flag adds, after the noise and times: independent re-computation
        gen = stream_generator(plain.cfg.train.seed, iteration, RandomPurpose.GLOBAL_BATCH)
        torch.randn((8, *plain.dataset.images.shape[1:]), generator=gen)
        sample_time(8, plain.time_config, generator=gen)
        drawn = (torch.rand(8, generator=gen) < p).view(2, 4)
        assert 0 < drawn.sum() < 8
        context, mask = dropping.empty_prompt
        for r, g, rows in zip(ref, got, drawn):
            assert torch.equal(r["noise"], g["noise"]) and torch.equal(r["t"], g["t"])  # same draws as before
            for i, dropped in enumerate(rows.tolist()):
                want = (context[0], mask[0]) if dropped else (r["context"][i], r["context_mask"][i])
                assert torch.equal(g["context"][i], want[0]) and torch.equal(g["context_mask"][i], want[1])


def test_caption_dropout_flag_range_is_checked():
    with pytest.raises(ValueError, match="--caption-dropout"):
        parse_args([*FLAGS, "--caption-dropout", "1"])


# ---- the CFG-enhanced APEX target through the trainer ----------------------------------------
def test_trainer_feeds_the_empty_prompt_to_the_cfg_enhanced_target(tmp_path, monkeypatch):
    from megatron_apex.objectives.apex import released

    seen = []
    real = released.cfg_enhanced_target

    def spy(reference, target, x_t, t, context, context_mask, uncond_context, uncond_context_mask, scale):
        seen.append((uncond_context, uncond_context_mask, scale))
        return real(reference, target, x_t, t, context, context_mask, uncond_context, uncond_context_mask, scale)

    monkeypatch.setattr(released, "cfg_enhanced_target", spy)
    trainer = _trainer(tmp_path, "--objective", "apex", "--apex-variant", "released", "--apex-start-iter", "0",
                       "--teacher", "frozen", "--apex-option", "cfg_scale=0.8", "--caption-dropout", "0.1")
    out = trainer.train_step()
    assert np.isfinite(out["loss"]) and seen
    context, mask = trainer.empty_prompt
    for uc, um, scale in seen:
        assert scale == 0.8
        assert torch.equal(uc[0], context[0]) and torch.equal(um[0], mask[0])


# ---- the guided sampler ----------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("method", ["euler", "flowmap"])
def test_guided_sampler_is_uncond_plus_scale_times_the_difference(method):
    model = ToyVelocityModel((2, 3, 3), seed=3).double().eval()
    _, z, _, c, m = make_batch(4, (2, 3, 3))
    uc = torch.randn(1, *c.shape[1:], dtype=c.dtype, generator=torch.Generator().manual_seed(1))
    um = torch.tensor([[True, True, False, False]])
    s, k, x = 3.0, 2, z.clone()
    for i in range(k):
        t, t_next = 1 - i / k, 1 - (i + 1) / k
        tv = torch.full((4,), t, dtype=z.dtype)
        tt = torch.full((4,), t_next, dtype=z.dtype) if method == "flowmap" else None
        v_c = model(x, tv, c, m, t_target=tt)
        v_u = model(x, tv, uc.expand(4, -1, -1), um.expand(4, -1), t_target=tt)
        x = x - (t - t_next) * (v_u + s * (v_c - v_u))
    got = sample(model, z, c, m, nfe=k, method=method, guidance_scale=s, uncond_context=uc, uncond_mask=um)
    torch.testing.assert_close(got, x)
    assert not torch.allclose(got, sample(model, z, c, m, nfe=k, method=method))
    with pytest.raises(ValueError, match="uncond_context"):
        sample(model, z, c, m, guidance_scale=s)


def test_sample_tool_writes_guided_samples(tmp_path):
    """tools/sample.py --guidance-scale on a trained checkpoint: the same images as the library call."""
    import importlib.util
    from pathlib import Path

    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample_seeded

    trainer = _trainer(tmp_path, "--caption-dropout", "0.2", "--save-interval", "2", "--train-iters", "2")
    trainer.train()
    spec = importlib.util.spec_from_file_location(
        "sample_tool", Path(__file__).resolve().parents[2] / "tools" / "sample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "guided"
    assert tool.main(["--load", str(tmp_path / "run"), "--guidance-scale", "2", "--num-per-prompt", "1",
                      "--nfe", "2", "--out", str(out)]) == 0
    with np.load(str(out) + ".npz") as f:
        images, scale = f["images"], float(f["guidance_scale"])
    assert scale == 2.0
    model, _ = load_model_for_inference(str(tmp_path / "run"))
    from megatron_apex.data.text_encoder import MiniLMTextEncoder

    manifest = trainer.dataset.manifest
    context, mask = MiniLMTextEncoder().encode(list(manifest["class_prompts"]), int(manifest["max_text_len"]))
    uc, um = empty_prompt_context(manifest, None, "test")
    ref = sample_seeded(model, torch.from_numpy(context), torch.from_numpy(mask), manifest["image_shape"], nfe=2,
                        seed=0, guidance_scale=2.0, uncond_context=torch.from_numpy(uc),
                        uncond_mask=torch.from_numpy(um))
    np.testing.assert_array_equal(images, tool.to_uint8(ref))
    plain = sample_seeded(model, torch.from_numpy(context), torch.from_numpy(mask), manifest["image_shape"], nfe=2,
                          seed=0)
    assert (plain - ref).abs().max() > 1e-6  # guidance changed the samples
