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

from family_cases import CASES  # noqa: E402
from megatron_apex.conversion import checkpoint_io, hf_io, verify  # noqa: E402
from megatron_apex.conversion.lora_diffusers import LORA_WEIGHT_NAME, export_diffusers_lora  # noqa: E402
from megatron_apex.conversion.random_weights import randomize_weights_  # noqa: E402
from megatron_apex.inference import diffusers_apex  # noqa: E402
from megatron_apex.inference.samplers import sample  # noqa: E402
from megatron_apex.lora import LoRAConfig, apply_lora, lora_modules  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


class Family:
    """A family's pieces for these tests: ``case`` (tests/family_cases.py), the LoRA targets and
    the APEX transformer class."""

    def __init__(self, name, targets):
        self.case, self.targets = CASES[name], targets
        self.apex = getattr(diffusers_apex, "Apex" + self.case.diffusers_class)
        self.target_prefix = self.case.target_embedder.split(".")[0] + "."

    def run(self, pipe, noise, ctx, mask, steps, method="flowmap"):
        """The pipeline's latents; an APEX one samples with ``method`` and a seeded generator."""
        extra = {}
        if type(pipe).__name__.startswith("Apex"):
            extra = dict(method=method, generator=torch.Generator().manual_seed(5))
        return self.case.pipeline_latents(pipe, noise, ctx, mask, steps, **extra)


@pytest.fixture(scope="module", params=[("qwen-image", "attn,img_in,proj_out"), ("sana", "attn,proj_out")],
                ids=lambda param: param[0])
def lora_run(request, tmp_path_factory):
    """(family pieces, base transformer folder, our adapted model, LoRA exported with the
    embedder beside it, LoRA exported without it). The base has a random non-zero target-time
    embedder; the "training" moves it and sets random adapters."""
    fam = Family(*request.param)
    root = tmp_path_factory.mktemp(fam.case.name)
    torch.manual_seed(0)
    randomize_weights_(fam.apex(**fam.case.arch), 3).save_pretrained(root / "base")
    model, _ = verify.load_ours_from_hf(checkpoint_io.get_family(fam.case.name), str(root / "base"))
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
    pipe = fam.case.pipeline(fam.apex.from_pretrained(base))
    pipe.load_lora_weights(str(lora))
    noise, ctx, mask = fam.case.pipeline_inputs()
    for steps, method in ((1, "flowmap"), (4, "flowmap"), (4, "release")):
        ours = sample(model, noise, ctx, mask, nfe=steps, method=method, generator=torch.Generator().manual_seed(5))
        theirs = fam.run(pipe, noise, ctx, mask, steps, method)
        assert (theirs - noise).abs().max() > 0.1
        assert (ours - theirs).abs().max().item() <= TOL, (steps, method)


def test_without_the_embedder_the_trained_jump_is_lost(lora_run):
    """A stock pipeline with the same LoRA: the Euler step of the adapted velocity head; an
    APEX pipeline with the embedder dropped: the base's embedder, not the trained one."""
    fam, base, model, lora, lora_drop = lora_run
    noise, ctx, mask = fam.case.pipeline_inputs()
    ours = sample(model, noise, ctx, mask, nfe=1)
    stock = fam.case.pipeline(fam.case.diffusers_model().from_pretrained(base), apex=False)
    stock.load_lora_weights(str(lora))
    theirs = fam.run(stock, noise, ctx, mask, 1)
    assert (theirs - sample(model, noise, ctx, mask, nfe=1, method="euler")).abs().max().item() <= TOL
    assert (theirs - ours).abs().max() > 0.5

    dropped = fam.case.pipeline(fam.apex.from_pretrained(base))
    dropped.load_lora_weights(str(lora_drop))
    assert not (lora_drop / hf_io.EXTRAS_NAME).exists()
    assert (fam.run(dropped, noise, ctx, mask, 1) - ours).abs().max() > 0.5


def test_a_stock_base_without_an_embedder_gets_the_trained_one(lora_run, tmp_path):
    """The LoRA of an APEX run on a base folder that has no target-time embedder (the stock
    release): load_lora_weights creates it from the side file."""
    fam, base, model, lora, _ = lora_run
    apex = fam.apex.from_pretrained(base)
    stock_keys = {k: v for k, v in apex.state_dict().items() if not k.startswith(fam.target_prefix)}
    bare = fam.apex(**fam.case.arch, target_time_embedder=False)
    bare.load_state_dict(stock_keys, strict=True)
    bare.save_pretrained(tmp_path / "bare")
    pipe = fam.case.pipeline(fam.apex.from_pretrained(tmp_path / "bare"))
    assert not pipe.transformer.has_target_time_embedder
    pipe.load_lora_weights(str(lora))
    noise, ctx, mask = fam.case.pipeline_inputs()
    ours = sample(model, noise, ctx, mask, nfe=1)
    assert pipe.transformer.has_target_time_embedder
    assert (fam.run(pipe, noise, ctx, mask, 1) - ours).abs().max().item() <= TOL
