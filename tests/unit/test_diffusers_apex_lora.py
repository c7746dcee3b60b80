"""A LoRA run's diffusers export through the APEX pipelines: adapters plus a trained target-time
embedder (written beside the LoRA file, extras="separate") loaded with ``load_lora_weights`` give
our adapted model's sampler latents (NFE = 1 and 4) for Qwen-Image and Sana; a stock pipeline
with the same LoRA takes the velocity head's Euler step, and an export that drops the embedder
misses the trained jump (both far from ours)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT

import test_convert_hf as qwen_tests  # noqa: E402  (their ARCH)
import test_convert_hf_sana as sana_tests  # noqa: E402
from megatron_apex.conversion import checkpoint_io, hf_io, verify  # noqa: E402
from megatron_apex.conversion.random_weights import randomize_weights_  # noqa: E402
from megatron_apex.inference.diffusers_apex import (  # noqa: E402
    ApexQwenImagePipeline,
    ApexQwenImageTransformer2DModel,
    ApexSanaPipeline,
    ApexSanaTransformer2DModel,
)
from megatron_apex.inference.samplers import sample  # noqa: E402
from megatron_apex.conversion.lora_diffusers import LORA_WEIGHT_NAME, export_diffusers_lora  # noqa: E402
from megatron_apex.lora import LoRAConfig, apply_lora, lora_modules  # noqa: E402
from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


class Qwen:
    family, apex, arch, targets = "qwen-image", ApexQwenImageTransformer2DModel, qwen_tests.ARCH, "attn,img_in,proj_out"
    target_prefix = "time_text_embed_2."

    @staticmethod
    def stock():
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    @staticmethod
    def pipeline(transformer, apex=True):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        cls = ApexQwenImagePipeline if apex else QwenImagePipeline
        pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                   transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def inputs():
        gen = torch.Generator().manual_seed(21)
        noise = torch.randn(2, Qwen.arch["out_channels"], 6, 8, generator=gen)
        ctx = torch.randn(2, 5, Qwen.arch["joint_attention_dim"], generator=gen)
        mask = torch.ones(2, 5)
        mask[1, 3:] = 0
        return noise, ctx, mask

    @staticmethod
    def run(pipe, noise, ctx, mask, steps, method="flowmap"):
        _, _, h, w = noise.shape
        args = dict(prompt_embeds=ctx, prompt_embeds_mask=mask, latents=pack_latents(noise, 2), height=h * 8,
                    width=w * 8, num_inference_steps=steps, output_type="latent", return_dict=False)
        if isinstance(pipe, ApexQwenImagePipeline):
            args.update(method=method, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return unpack_latents(pipe(**args)[0], h, w, 2)


class Sana:
    family, apex, arch, targets = "sana", ApexSanaTransformer2DModel, sana_tests.ARCH, "attn,proj_out"
    target_prefix = "time_embed_2."

    @staticmethod
    def stock():
        from diffusers import SanaTransformer2DModel

        return SanaTransformer2DModel

    @staticmethod
    def pipeline(transformer, apex=True):
        from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

        cls = ApexSanaPipeline if apex else SanaPipeline
        pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                   scheduler=FlowMatchEulerDiscreteScheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def inputs():
        gen = torch.Generator().manual_seed(21)
        noise = torch.randn(2, Sana.arch["in_channels"], 8, 6, generator=gen)
        ctx = torch.randn(2, 5, Sana.arch["caption_channels"], generator=gen)
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0
        return noise, ctx, mask

    @staticmethod
    def run(pipe, noise, ctx, mask, steps, method="flowmap"):
        _, _, h, w = noise.shape
        args = dict(prompt_embeds=ctx, prompt_attention_mask=mask, latents=noise, height=h * pipe.vae_scale_factor,
                    width=w * pipe.vae_scale_factor, num_inference_steps=steps, use_resolution_binning=False,
                    guidance_scale=1.0, output_type="latent", return_dict=False)
        if isinstance(pipe, ApexSanaPipeline):
            args.update(method=method, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return pipe(**args)[0]


@pytest.fixture(scope="module", params=[Qwen, Sana], ids=["qwen-image", "sana"])
def lora_run(request, tmp_path_factory):
    """(family helpers, base transformer folder, our adapted model, LoRA exported with the
    embedder beside it, LoRA exported without it). The base has a random non-zero target-time
    embedder; the "training" moves it and sets random adapters."""
    fam = request.param
    root = tmp_path_factory.mktemp(fam.family)
    torch.manual_seed(0)
    randomize_weights_(fam.apex(**fam.arch), 3).save_pretrained(root / "base")
    model, _ = verify.load_ours_from_hf(checkpoint_io.get_family(fam.family), str(root / "base"))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=fam.targets))  # the embedder trains with the adapters
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
        for p in model.target_time_embedder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std())
    export_diffusers_lora(model, str(root / "lora"), extras="separate")
    export_diffusers_lora(model, str(root / "lora_drop"), extras="drop")
    return fam, root / "base", model.eval(), root / "lora", root / "lora_drop"


def test_lora_with_its_embedder_loads_into_the_apex_pipeline_and_takes_our_steps(lora_run):
    fam, base, model, lora, _ = lora_run
    side = json.loads(__import__("safetensors").safe_open(str(lora / LORA_WEIGHT_NAME), "pt").metadata()[
        "megatron_apex_lora"])
    assert side["extras_file"] == hf_io.EXTRAS_NAME and side["dropped_extras"] == []
    pipe = fam.pipeline(fam.apex.from_pretrained(base))
    pipe.load_lora_weights(str(lora))
    noise, ctx, mask = fam.inputs()
    for steps, method in ((1, "flowmap"), (4, "flowmap"), (4, "release")):
        ours = sample(model, noise, ctx, mask, nfe=steps, method=method, generator=torch.Generator().manual_seed(5))
        theirs = fam.run(pipe, noise, ctx, mask, steps, method)
        assert (theirs - noise).abs().max() > 0.1
        assert (ours - theirs).abs().max().item() <= TOL, (steps, method)


def test_without_the_embedder_the_trained_jump_is_lost(lora_run):
    """A stock pipeline with the same LoRA: the Euler step of the adapted velocity head; an
    APEX pipeline with the embedder dropped: the base's embedder, not the trained one."""
    fam, base, model, lora, lora_drop = lora_run
    noise, ctx, mask = fam.inputs()
    ours = sample(model, noise, ctx, mask, nfe=1)
    stock = fam.pipeline(fam.stock().from_pretrained(base), apex=False)
    stock.load_lora_weights(str(lora))
    theirs = fam.run(stock, noise, ctx, mask, 1)
    assert (theirs - sample(model, noise, ctx, mask, nfe=1, method="euler")).abs().max().item() <= TOL
    assert (theirs - ours).abs().max() > 0.5

    dropped = fam.pipeline(fam.apex.from_pretrained(base))
    dropped.load_lora_weights(str(lora_drop))
    assert not (lora_drop / hf_io.EXTRAS_NAME).exists()
    assert (fam.run(dropped, noise, ctx, mask, 1) - ours).abs().max() > 0.5


def test_a_stock_base_without_an_embedder_gets_the_trained_one(lora_run, tmp_path):
    """The LoRA of an APEX run on a base folder that has no target-time embedder (the stock
    release): load_lora_weights creates it from the side file."""
    fam, base, model, lora, _ = lora_run
    apex = fam.apex.from_pretrained(base)
    stock_keys = {k: v for k, v in apex.state_dict().items() if not k.startswith(fam.target_prefix)}
    bare = fam.apex(**fam.arch, target_time_embedder=False)
    bare.load_state_dict(stock_keys, strict=True)
    bare.save_pretrained(tmp_path / "bare")
    pipe = fam.pipeline(fam.apex.from_pretrained(tmp_path / "bare"))
    assert not pipe.transformer.has_target_time_embedder
    pipe.load_lora_weights(str(lora))
    noise, ctx, mask = fam.inputs()
    ours = sample(model, noise, ctx, mask, nfe=1)
    assert pipe.transformer.has_target_time_embedder
    assert (fam.run(pipe, noise, ctx, mask, 1) - ours).abs().max().item() <= TOL
