"""tools/prepare_data.py's library: deterministic, resumable shards; skipped inputs reported;
hostile tar members refused; latents equal to an independent encoding of the same pixels."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from tiny_encoders import corpus_tokenizer, tiny_text_encoder
from tiny_vaes import tiny_vae

from megatron_apex.data.prepare import PrepareConfig, prepare

# (height, width): exact bucket sizes of --resolution 28 with multiple 4, so resizing is the identity
SIZES = [(28, 28), (20, 40), (40, 20), (24, 32)]


def _images(folder, n=9, caption_missing=(3,), undecodable=(5,)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = {}
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        path = folder / f"img{i:02d}.png"
        if i in undecodable:
            path.write_bytes(b"\x89PNG but not really")
        else:
            pixels[path.name] = rng.integers(0, 256, (h, w), dtype=np.uint8)
            Image.fromarray(pixels[path.name]).save(path)
        if i not in caption_missing:
            (folder / f"img{i:02d}.txt").write_text(f"picture number {i}")
    return pixels


def _cfg(inputs, output, **kw):
    base = dict(vae="none", channels=1, resolution=28, patch_size=4, max_text_len=8, samples_per_shard=3,
                progress=False)
    return PrepareConfig(inputs=[str(i) for i in inputs], output=str(output), **{**base, **kw})


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_interrupted_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch):
    import megatron_apex.data.prepare.run as prep  # the driver, whose build_shard the interruption replaces

    pixels = _images(tmp_path / "in", n=12)
    whole = tmp_path / "whole"
    first = prepare(_cfg([tmp_path / "in"], whole), log=lambda m: None)
    assert first["shards"] == 4 and first["shards_written"] == 4

    # an interruption (Ctrl-C) after two shards, plus a half-written file of a killed writer
    out = tmp_path / "out"
    real, calls = prep.build_shard, []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "build_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg([tmp_path / "in"], out), log=lambda m: None)
    monkeypatch.setattr(prep, "build_shard", real)
    done = sorted(p.name for p in out.glob("shard-*.tar"))
    assert done == ["shard-000000.tar", "shard-000001.tar"] and not (out / "manifest.json").exists()
    (out / "shard-000002.tar.tmp-424242").write_bytes(b"half a shard")
    mtimes = {name: (out / name).stat().st_mtime_ns for name in done}

    # the rerun (two worker processes this time) writes only the missing shards
    second = prepare(_cfg([tmp_path / "in"], out, workers=2), log=lambda m: None)
    assert second["shards_written"] == 2 and second["shards_kept"] == 2
    assert {name: (out / name).stat().st_mtime_ns for name in done} == mtimes  # untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for path in whole.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    shards = sorted(out.glob("shard-*.tar"))

    # the samples: key = input index, latent = pixels / 127.5 - 1 as float16 (identity resize)
    members = {}
    for p in shards:
        members.update(_members(p))
    for m in tarfile.open(shards[0]).getmembers():
        assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == ""
    got = json.loads((out / "manifest.json").read_text())
    assert got["count"] == len(pixels) - 1  # img03 has no caption
    from megatron_apex.data.text_encoder import MiniLMTextEncoder

    states, masks = MiniLMTextEncoder().encode([f"picture number {i}" for i in range(12)], 8)
    for i in range(12):
        name = f"img{i:02d}.png"
        key = f"{i:08d}"
        if name not in pixels or i == 3:
            assert f"{key}.latent.npy" not in members
            continue
        lat = np.load(io.BytesIO(members[f"{key}.latent.npy"]))
        ref = (pixels[name].astype(np.float32) / 127.5 - 1.0).astype(np.float16)[None]
        np.testing.assert_array_equal(lat, ref)
        info = json.loads(members[f"{key}.json"])
        assert info["original_size"] == list(pixels[name].shape) == info["bucket"] == info["latent_size"]
        assert members[f"{key}.txt"].decode() == f"picture number {i}"
        mask = np.load(io.BytesIO(members[f"{key}.mask.npy"]))
        ctx = np.load(io.BytesIO(members[f"{key}.ctx.npy"]))
        assert mask.all() and len(mask) == masks[i].sum()
        np.testing.assert_allclose(ctx.astype(np.float32), states[i][:len(mask)], rtol=1e-3, atol=1e-3)
    empty, empty_mask = MiniLMTextEncoder().encode([""], 8)
    np.testing.assert_allclose(np.load(out / "empty_prompt.npy").astype(np.float32), empty[0][empty_mask[0]],
                               rtol=1e-3, atol=1e-3)


def test_skipped_inputs_are_summarised_with_reasons(tmp_path):
    _images(tmp_path / "in", n=7, caption_missing=(1, 4), undecodable=(2,))
    logs = []
    summary = prepare(_cfg([tmp_path / "in"], tmp_path / "out"), log=logs.append)
    reasons = {os.path.basename(s["input"]): s["reason"] for s in summary["skipped"]}
    assert reasons == {"img01.png": "missing caption", "img04.png": "missing caption",
                       "img02.png": reasons["img02.png"]}
    assert reasons["img02.png"].startswith("undecodable image")
    assert summary["samples"] == 7 - 3
    assert any("skipped 3 inputs: 2 missing caption, 1 undecodable image" in line for line in logs)


def test_tar_and_jsonl_inputs_and_a_hostile_member_name(tmp_path):
    pixels = _images(tmp_path / "in", n=4, caption_missing=(), undecodable=())
    archive = tmp_path / "pack.tar"
    with tarfile.open(archive, "w") as tar:
        for name in sorted(os.listdir(tmp_path / "in")):
            tar.add(tmp_path / "in" / name, arcname=f"sub/{name}")
    lines = [json.dumps({"path": f"in/{name}", "caption": f"jsonl {name}"}) for name in sorted(pixels)]
    (tmp_path / "list.jsonl").write_text("\n".join(lines + ['{"caption": "no path"}']))
    summary = prepare(_cfg([archive, tmp_path / "list.jsonl"], tmp_path / "out", samples_per_shard=100),
                      log=lambda m: None)
    assert summary["samples"] == 8 and len(summary["skipped"]) == 1
    assert "no 'path'" in summary["skipped"][0]["reason"]
    members = _members(tmp_path / "out" / "shard-000000.tar")
    captions = sorted(v.decode() for k, v in members.items() if k.endswith(".txt"))
    assert captions == sorted([f"jsonl {n}" for n in pixels] + [f"picture number {i}" for i in range(4)])

    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        info = tarfile.TarInfo("../x.png")
        data = (tmp_path / "in" / "img00.png").read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"hostile.tar: member '../x.png' points outside"):
        prepare(_cfg([hostile], tmp_path / "out2"), log=lambda m: None)
    assert not (tmp_path / "out2" / "manifest.json").exists()
    assert not list((tmp_path / "out2").glob("shard-*")) if (tmp_path / "out2").exists() else True


def test_truncated_tar_member_and_json_sidecar_captions(tmp_path):
    rng = np.random.default_rng(2)
    pngs = {}
    for name in ("a", "b", "c", "d"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
        pngs[name] = buf.getvalue()
    members = [("a.png", pngs["a"]), ("a.json", json.dumps({"caption": "from json"}).encode()),
               ("b.png", pngs["b"]), ("b.json", b'{"text": "no caption key"}'),
               ("c.png", pngs["c"]), ("c.txt", b"from txt"),
               ("d.txt", b"cut short"), ("d.png", pngs["d"])]
    archive = tmp_path / "cut.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = archive.read_bytes()
    archive.write_bytes(blob[:blob.rindex(pngs["d"][:64]) + 100])  # d.png loses all but 100 bytes
    summary = prepare(_cfg([archive], tmp_path / "out", samples_per_shard=10), log=lambda m: None)
    reasons = {s["input"].replace(str(archive), "cut.tar"): s["reason"] for s in summary["skipped"]}
    assert reasons == {"cut.tar": "damaged tar after 8 members (ReadError); the members before it are used",
                       "cut.tar:b.png": "caption json has no 'caption' string",
                       "cut.tar:d.png": "unreadable image (ReadError)"}
    assert summary["samples"] == 2
    got = _members(tmp_path / "out" / "shard-000000.tar")
    assert sorted(v.decode() for k, v in got.items() if k.endswith(".txt")) == ["from json", "from txt"]


def _pipeline_latents(vae, x):
    """What the diffusers pipelines make of an image batch in [-1, 1] (written from their code)."""
    import torch

    name = type(vae).__name__
    with torch.no_grad():
        if name == "AutoencoderKLQwenImage":  # QwenImageImg2ImgPipeline._encode_vae_image, mode not sample
            z = vae.encode(x[:, :, None]).latent_dist.mode()
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            return ((z - mean) * inv_std)[:, :, 0]
        if name == "AutoencoderDC":  # SanaSprintImg2ImgPipeline: encode(x).latent * scaling_factor
            return vae.encode(x).latent * vae.config.scaling_factor
        z = vae.encode(x).latent_dist.mode()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor


@pytest.mark.parametrize("class_name", ["AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderDC"])
def test_vae_latents_match_the_diffusers_pipelines(tmp_path, class_name):
    import torch

    vae = tiny_vae(class_name).eval()
    vae.save_pretrained(tmp_path / "vae")
    folder = tmp_path / "rgb"
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = {}
    for i, (h, w) in enumerate([(16, 16), (12, 20), (20, 12)]):  # buckets of --resolution 16, multiple 2 x 2
        images[i] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"colour {i}")
    summary = prepare(_cfg([folder], tmp_path / "out", vae=str(tmp_path / "vae"), resolution=16, patch_size=2,
                           samples_per_shard=10), log=lambda m: None)
    assert summary["samples"] == 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["latent_channels"] == 4 and manifest["vae"]["downsample"] == 2
    assert manifest["vae"]["cls"] == class_name
    members = _members(tmp_path / "out" / "shard-000000.tar")
    for i, pixels in images.items():
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        ref = _pipeline_latents(vae, x)[0].numpy()
        lat = np.load(io.BytesIO(members[f"{i:08d}.latent.npy"]))
        assert lat.dtype == np.float16 and lat.shape == (4, pixels.shape[0] // 2, pixels.shape[1] // 2)
        np.testing.assert_allclose(lat.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def _corpus_tokenizer(bos: bool):
    """The tests' tokenizer, trained on their captions in both cases."""
    return corpus_tokenizer([*_CAPTIONS.values(), *(c.lower() for c in _CAPTIONS.values())], bos)


# mixed case: Sana's pipeline lower-cases captions, Qwen-Image's does not
_CAPTIONS = {f"{i:08d}": f"Picture Number {i} of a CAT" + " and More words" * (3 * i) for i in range(4)}


def _tiny_text_encoder(kind, folder):
    """A random Qwen2.5-VL (32 wide) or Gemma-2 (24 wide) saved with the tests' tokenizer."""
    return tiny_text_encoder(kind, folder, [*_CAPTIONS.values(), *(c.lower() for c in _CAPTIONS.values())])


def _qwen_template():
    """QwenImagePipeline's template, read from a pipeline built around nothing."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.__new__(QwenImagePipeline)
    try:
        QwenImagePipeline.__init__(pipe, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                   transformer=None)
    except Exception:  # register_modules may refuse None components; the template is set after it
        pass
    return pipe.prompt_template_encode, pipe.tokenizer_max_length


def _sana_instruction():
    """SanaPipeline.__call__'s default complex_human_instruction."""
    import inspect

    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def _pipeline_prompts(kind, model, tok, captions, max_len):
    """What the pipelines' own encode_prompt feeds their transformers, called on a stand-in
    `self` holding only the tokenizer and text encoder, with the arguments __call__ passes:
    [(states (T, D), mask (T,))] per caption, and the same for the empty negative prompt."""
    import torch
    from diffusers import QwenImagePipeline, SanaPipeline

    cpu = torch.device("cpu")
    if kind == "qwen2_5_vl":
        template, tokenizer_max_length = _qwen_template()
        pipe = QwenImagePipeline.__new__(QwenImagePipeline)
        # the template's system part in this tokenizer (34 in Qwen2's), counted here on its own
        drop = len(tok(template.split("{}")[0], add_special_tokens=False)["input_ids"])
        pipe.__dict__.update(tokenizer=tok, text_encoder=model, tokenizer_max_length=tokenizer_max_length,
                             prompt_template_encode=template, prompt_template_encode_start_idx=drop)
        out = []
        for prompts in (captions, [""]):
            emb, mask = pipe.encode_prompt(prompts, device=cpu, max_sequence_length=max_len)
            mask = torch.ones(emb.shape[:2], dtype=torch.long) if mask is None else mask
            out.append(list(zip(emb, mask)))
        return out
    pipe = SanaPipeline.__new__(SanaPipeline)
    pipe.__dict__.update(tokenizer=tok, text_encoder=model)
    emb, mask, neg, neg_mask = pipe.encode_prompt(captions, do_classifier_free_guidance=True, negative_prompt="",
                                                  device=cpu, max_sequence_length=max_len,
                                                  complex_human_instruction=_sana_instruction())
    return list(zip(emb, mask)), list(zip(neg[:1], neg_mask[:1]))


def _real_tokens(states, mask):
    """The masked states, after checking that the mask is ones then zeros: then the loader's
    padding (zeros after the real tokens, mask False) gives the transformer the same input."""
    mask = mask.bool()
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()
    return states[:n].detach().float().numpy()


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "gemma2"])
def test_transformers_text_encoders_match_the_pipelines_encode_prompt(tmp_path, kind):
    from megatron_apex.data.encoders import QWEN_TEMPLATE, SANA_COMPLEX_HUMAN_INSTRUCTION

    assert QWEN_TEMPLATE == _qwen_template()[0]
    assert list(SANA_COMPLEX_HUMAN_INSTRUCTION) == _sana_instruction()
    model, tok = _tiny_text_encoder(kind, tmp_path / "te")
    _images(tmp_path / "in", n=4, caption_missing=(), undecodable=())
    for i, caption in enumerate(_CAPTIONS.values()):
        (tmp_path / "in" / f"img{i:02d}.txt").write_text(caption)
    max_len = 30
    prepare(_cfg([tmp_path / "in"], tmp_path / "out", text_encoder=str(tmp_path / "te"), max_text_len=max_len,
                 samples_per_shard=10), log=lambda m: None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["context_dim"] == (32 if kind == "qwen2_5_vl" else 24)
    members = _members(tmp_path / "out" / "shard-000000.tar")
    prompts, negative = _pipeline_prompts(kind, model, tok, list(_CAPTIONS.values()), max_len)
    refs = [_real_tokens(e, m) for e, m in prompts]
    for key, ref in zip(_CAPTIONS, refs):
        ctx = np.load(io.BytesIO(members[f"{key}.ctx.npy"]))
        mask = np.load(io.BytesIO(members[f"{key}.mask.npy"]))
        assert ctx.shape == ref.shape and mask.shape == (len(ref),) and mask.all()
        np.testing.assert_allclose(ctx.astype(np.float32), ref, rtol=3e-3, atol=3e-3)
    # some captions are shorter than --max-text-len, the longest are cut at it
    lengths = [len(r) for r in refs]
    assert min(lengths) < max_len == max(lengths)
    # the empty prompt (caption dropout, classifier-free guidance): the pipeline's negative prompt
    empty = np.load(tmp_path / "out" / "empty_prompt.npy")
    np.testing.assert_allclose(empty.astype(np.float32), _real_tokens(*negative[0]), rtol=3e-3, atol=3e-3)


def test_sana_instruction_and_lower_case_change_the_states(tmp_path):
    """The Sana settings the test above checks are not inert: without the instruction, or with
    the caption's case kept, the states differ from the pipeline's."""
    import torch

    from megatron_apex.data.encoders import TransformersTextEncoder

    model, tok = _tiny_text_encoder("gemma2", tmp_path / "te")
    caption = _CAPTIONS["00000000"]
    (ref,) = [_real_tokens(e, m) for e, m in _pipeline_prompts("gemma2", model, tok, [caption], 40)[0]]
    with_instruction = TransformersTextEncoder(str(tmp_path / "te")).encode([caption], 40)[0]
    np.testing.assert_allclose(with_instruction, ref, rtol=1e-4, atol=1e-5)
    bare = TransformersTextEncoder(str(tmp_path / "te"), complex_human_instruction=False).encode([caption], 40)[0]
    assert bare.shape != ref.shape or not np.allclose(bare, ref, atol=1e-2)
    # the bare encoding is the caption's own states, lower-cased: the case matters to this tokenizer
    ids = tok(caption.lower(), return_tensors="pt")
    with torch.no_grad():
        plain = model(ids["input_ids"], attention_mask=ids["attention_mask"])[0][0].numpy()
    np.testing.assert_allclose(bare, plain, rtol=1e-4, atol=1e-5)
    assert tok(caption)["input_ids"] != tok(caption.lower())["input_ids"]


def test_default_text_length_follows_the_recipes(tmp_path):
    """--max-text-len unset: each family's recipe TEXT_LEN (Qwen-Image, Sana), and 256 for others."""
    import re as regex
    from pathlib import Path

    from megatron_apex.data.prepare import resolve_config

    recipes = Path(__file__).resolve().parents[2] / "examples" / "recipes"

    def recipe_len(name):
        return int(regex.search(r"^TEXT_LEN=(\d+)", (recipes / name).read_text(), regex.M).group(1))

    expected = {"qwen2_5_vl": recipe_len("qwen_image_20b_full.sh"), "gemma2": recipe_len("sana_full.sh"),
                "t5": 256, "minilm": 256}
    assert recipe_len("qwen_image_20b_lora.sh") == expected["qwen2_5_vl"]
    for kind, length in expected.items():
        folder = "minilm"
        if kind != "minilm":
            folder = tmp_path / kind
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"model_type": kind, "hidden_size": 8}))
        cfg = resolve_config(PrepareConfig(inputs=["x"], output=str(tmp_path / "o"), text_encoder=str(folder),
                                           device="cpu"))
        assert cfg.max_text_len == length, kind
        assert (cfg.dtype, cfg.decoder) == ("float32", "pil")


def test_a_pipeline_folder_text_encoder_finds_its_tokenizer_beside_it(tmp_path):
    """A diffusers pipeline keeps `tokenizer/` apart from `text_encoder/`: --text-encoder
    PIPE/text_encoder encodes exactly as a folder holding both."""
    import shutil

    from megatron_apex.data.encoders import TransformersTextEncoder, tokenizer_folder

    both = tmp_path / "both"
    _tiny_text_encoder("qwen2_5_vl", both)
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder").mkdir(parents=True)
    (pipe / "tokenizer").mkdir()
    for path in both.iterdir():
        is_model = path.name in ("config.json", "generation_config.json") or path.suffix == ".safetensors"
        shutil.copy(path, pipe / ("text_encoder" if is_model else "tokenizer") / path.name)
    assert tokenizer_folder(str(pipe / "text_encoder")) == str(pipe / "tokenizer")
    assert tokenizer_folder(str(both)) == str(both)
    captions = ["a red fox", "two cups on a table"]
    ours = TransformersTextEncoder(str(pipe / "text_encoder")).encode(captions, 16)
    reference = TransformersTextEncoder(str(both)).encode(captions, 16)
    for a, b in zip(ours, reference):
        np.testing.assert_array_equal(a, b)
