"""What the family-parametrised tests (``@pytest.mark.parametrize("family", FAMILIES)``) need to
know about each model family, in one table, and the helpers they share: random diffusers
models and folders, diffusers' forward written out as the pipelines call it (the independent
reference), tools/convert_hf.py run in this process, and the parts of an offline SanaPipeline.

The names and flags here are written by hand, not read from megatron_apex.families: the tests
check what the registry's mapping and models produce against them.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch

from megatron_apex.conversion.random_weights import randomize_weights_

ROOT = Path(__file__).resolve().parents[1]
# float32 forward and gradient parity with diffusers (max abs difference)
TOL = 1e-5


def qwen_image_velocity(hf, x, t, ctx, mask) -> torch.Tensor:
    """diffusers' velocity for x of shape (B, C, H, W): packed and unpacked by QwenImagePipeline's
    own helpers (2x2 patches, vae_scale_factor 8)."""
    from diffusers import QwenImagePipeline

    assert hf.config.patch_size == 2, "QwenImagePipeline packs 2x2 patches"
    b, c, h, w = x.shape
    tokens = QwenImagePipeline._pack_latents(x, b, c, h, w)
    out = hf(hidden_states=tokens, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t,
             img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
    # _unpack_latents takes pixel sizes (latent * vae_scale_factor) and returns (B, C, 1, H, W).
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


def sana_velocity(hf, x, t, ctx, mask) -> torch.Tensor:
    """diffusers' velocity as Sana's flow pipelines ask for it: timestep = 1000 * sigma."""
    return hf(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t * 1000,
              return_dict=False)[0]


def qwen_image_pipeline_latents(pipe, noise, ctx, mask, steps, **kwargs) -> torch.Tensor:
    """A QwenImagePipeline's latents from ``noise`` (B, C, H, W) and text states: packed in and
    unpacked out by the pipeline's own helpers."""
    b, c, h, w = noise.shape
    f = pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe(prompt_embeds=ctx, prompt_embeds_mask=mask, latents=pipe._pack_latents(noise, b, c, h, w),
                   height=h * f, width=w * f, num_inference_steps=steps, output_type="latent", return_dict=False,
                   **kwargs)[0]
    return pipe._unpack_latents(out, h * f, w * f, f)[:, :, 0]


def sana_pipeline_latents(pipe, noise, ctx, mask, steps, **kwargs) -> torch.Tensor:
    """A SanaPipeline's latents from ``noise`` (B, C, H, W) and caption states, no guidance."""
    _, _, h, w = noise.shape
    f = pipe.vae_scale_factor
    with torch.no_grad():
        return pipe(prompt_embeds=ctx, prompt_attention_mask=mask, latents=noise, height=h * f, width=w * f,
                    num_inference_steps=steps, use_resolution_binning=False, guidance_scale=1.0,
                    output_type="latent", return_dict=False, **kwargs)[0]


def _named(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class FamilyCase:
    name: str  # the registered family: tools/convert_hf.py --model
    tiny_test: str  # the unit tests' preset
    tiny: str  # the preset of the built-in data's shapes (28x28 grey, 384-d MiniLM states)
    released: Tuple[str, ...]  # released sizes: counted against diffusers on meta, too big to build
    diffusers_class: str
    pipeline_class: str  # diffusers' pipeline (ours: "Apex" + it, megatron_apex.inference.diffusers_apex)
    config_class: str  # our config, "module:Class"
    model_class: str  # our model, "module:Class"
    arch: Dict[str, Any]  # a tiny diffusers architecture (2 latent channels) the conversion tests save
    context_field: str  # the config field of the text states' width
    channels_flag: str  # the flag the model names when x_t has other channels
    context_flag: str  # ... and when the text states have another width
    time_embedder: str  # diffusers' timestep embedder
    target_embedder: str  # where diffusers files keep the APEX target-time embedder
    self_attention: str  # diffusers' self-attention of block {i}
    velocity: Callable[..., torch.Tensor]  # diffusers' forward: (hf, x, t, ctx, mask) -> velocity
    # a pipeline without VAE and text encoder: (pipe, noise, ctx, mask, steps, **call) -> latents
    pipeline_latents: Callable[..., torch.Tensor]

    @property
    def context_width(self) -> int:
        return self.arch[self.context_field]

    def diffusers_model(self):
        return getattr(importlib.import_module("diffusers"), self.diffusers_class)

    def pipeline_inputs(self, seed=21):
        """(noise, text states, mask) for a pipeline: 2 samples of 6x8 latents and 5 tokens, the
        second padded after 3."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(2, self.arch["out_channels"], 6, 8, generator=gen)
        ctx = torch.randn(2, 5, self.context_width, generator=gen)
        mask = torch.ones(2, 5)
        mask[1, 3:] = 0
        return noise, ctx, mask

    def pipeline(self, transformer, apex: bool = True):
        """The family's pipeline around ``transformer`` (no VAE or text encoder: latents from text
        states), APEX or stock, with the one-step-capable Euler scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        module = "megatron_apex.inference.diffusers_apex" if apex else "diffusers"
        cls = _named(f"{module}:{'Apex' if apex else ''}{self.pipeline_class}")
        pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                   transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def our_config_class(self):
        return _named(self.config_class)

    def our_model_class(self):
        return _named(self.model_class)

    def random_diffusers(self, seed=0, dtype=torch.float32, **arch):
        """A diffusers model of ``arch`` (over the table's) with every weight random."""
        torch.manual_seed(seed)
        model = self.diffusers_model()(**{**self.arch, **arch}).eval()
        randomize_weights_(model, seed + 1)
        return model.to(dtype)

    def save_diffusers(self, path, seed=0, max_shard_size="5GB", dtype=torch.float32, **arch) -> Path:
        self.random_diffusers(seed, dtype, **arch).save_pretrained(path, max_shard_size=max_shard_size)
        return Path(path)


QWEN_IMAGE = FamilyCase(
    name="qwen-image", tiny_test="qwen-image-tiny-test", tiny="qwen-image-tiny", released=("qwen-image-20b",),
    diffusers_class="QwenImageTransformer2DModel", pipeline_class="QwenImagePipeline",
    config_class="megatron_apex.models.qwen_image.config:QwenImageConfig",
    model_class="megatron_apex.models.qwen_image.model:QwenImageModel",
    arch=dict(patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8, num_attention_heads=4,
              joint_attention_dim=12, axes_dims_rope=(2, 2, 4)),
    context_field="joint_attention_dim", channels_flag="--out-channels", context_flag="--joint-attention-dim",
    time_embedder="time_text_embed.timestep_embedder", target_embedder="time_text_embed_2.timestep_embedder",
    self_attention="transformer_blocks.{i}.attn.", velocity=qwen_image_velocity,
    pipeline_latents=qwen_image_pipeline_latents,
)
SANA = FamilyCase(
    name="sana", tiny_test="sana-tiny-test", tiny="sana-tiny", released=("sana-0.6b", "sana-1.6b"),
    diffusers_class="SanaTransformer2DModel", pipeline_class="SanaPipeline",
    config_class="megatron_apex.models.sana.config:SanaConfig",
    model_class="megatron_apex.models.sana.model:SanaModel",
    arch=dict(in_channels=2, out_channels=2, num_attention_heads=4, attention_head_dim=8, num_layers=2,
              num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=32, caption_channels=12,
              sample_size=8, patch_size=2),
    context_field="caption_channels", channels_flag="--in-channels", context_flag="--caption-channels",
    time_embedder="time_embed.emb.timestep_embedder", target_embedder="time_embed_2.emb.timestep_embedder",
    self_attention="transformer_blocks.{i}.attn1.", velocity=sana_velocity, pipeline_latents=sana_pipeline_latents,
)
CASES = {case.name: case for case in (QWEN_IMAGE, SANA)}
FAMILIES = tuple(CASES)


def dead_ends(family: str, num_layers: int) -> set:
    """Our parameters no gradient reaches: Qwen-Image's last block's text stream output is
    discarded (as in diffusers), so its text-query norm, text output projection and text MLP
    get none."""
    if family != "qwen-image":
        return set()
    last = f"layers.{num_layers - 1}."
    dead = {last + "attention.added_q_layernorm.weight"}
    dead |= {last + f"attention.linear_added_proj.{p}" for p in ("weight", "bias")}
    dead |= {last + f"txt_mlp.linear_fc{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    return dead


def model_inputs(config, context_width: int, B=3, H=6, W=8, L=5, seed=1):
    """(x, t, ctx, mask) for a model of ``config``: random, the second sample's text padded after
    3 tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.out_channels, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, context_width, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    return x, t, ctx, mask


# ============================================================================ tools/convert_hf.py
_TOOL = []


def convert(*argv) -> int:
    """tools/convert_hf.py's exit status for ``argv``, run in this process."""
    if not _TOOL:
        spec = importlib.util.spec_from_file_location("convert_hf_tool", ROOT / "tools" / "convert_hf.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOL.append(module)
    return _TOOL[0].main([str(a) for a in argv])


def read_folder(path) -> dict:
    """Every tensor of a diffusers folder (sharded or not), by key."""
    from megatron_apex.conversion import hf_io

    with hf_io.SafetensorsFolder(str(path)) as folder:
        return {k: folder[k] for k in folder}


# ============================================================================ an offline SanaPipeline
SANA_PROMPTS = ["a cat", "a dog on the grass"]


def tiny_text_stack(width: int):
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


def tiny_dc_ae(latent_channels: int):
    from diffusers import AutoencoderDC

    torch.manual_seed(1)
    two = ("ResBlock", "ResBlock")
    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=4,
                         encoder_block_types=two, decoder_block_types=two, encoder_block_out_channels=(8, 8),
                         decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                         decoder_qkv_multiscales=((), ()), scaling_factor=0.5).eval()


def assert_sana_pipeline_matches_our_one_step(pipe, checkpoint: str) -> None:
    """``pipe`` (a SanaPipeline) and our NFE = 1 sampler on ``checkpoint`` take the same Euler step
    from the same noise and prompts, and the pipeline's VAE decodes ours as it decodes its own."""
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample

    pipe.set_progress_bar_config(disable=True)
    h, w = 32, 16  # latent grid; the pipeline wants pixel sizes divisible by 32
    noise = torch.randn(2, pipe.transformer.config.in_channels, h, w, generator=torch.Generator().manual_seed(21))
    common = dict(prompt=SANA_PROMPTS, height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor,
                  num_inference_steps=1, guidance_scale=1.0, latents=noise, use_resolution_binning=False,
                  complex_human_instruction=None, max_sequence_length=8, return_dict=False)
    with torch.no_grad():
        theirs = pipe(output_type="latent", **common)[0]
        images = pipe(output_type="pt", **common)[0]
        ctx, mask, _, _ = pipe.encode_prompt(SANA_PROMPTS, do_classifier_free_guidance=False, max_sequence_length=8,
                                             complex_human_instruction=None)
    assert mask[0].sum() < mask[1].sum() < mask.shape[1] + 1  # padded captions of different lengths

    model, _ = load_model_for_inference(checkpoint)
    ours = sample(model, noise, ctx, mask, nfe=1)  # tools/sample.py's default method
    assert (theirs - noise).abs().max() > 0.1  # the step moved the latents
    assert (ours - theirs).abs().max().item() <= TOL
    with torch.no_grad():
        decoded = pipe.vae.decode(ours / pipe.vae.config.scaling_factor, return_dict=False)[0]
    assert (pipe.image_processor.postprocess(decoded, output_type="pt") - images).abs().max().item() <= 1e-4
