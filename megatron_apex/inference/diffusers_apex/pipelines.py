"""The APEX pipelines: the stock ``QwenImagePipeline`` / ``SanaPipeline`` whose ``__call__`` runs
``megatron_apex.inference.samplers`` (``method`` flowmap / euler / renoise / release;
``num_inference_steps`` = NFE) instead of the scheduler, which load their transformer with the
APEX class, and whose ``load_lora_weights`` also loads the trained target-time embedder that
``tools/export_lora.py`` writes beside the LoRA.
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel, SanaPipeline, SanaTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.sana import pipeline_sana
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from safetensors.torch import load_file

from megatron_apex.inference.diffusers_apex.models import (
    EXTRAS_NAME,
    SANA_TIMESTEP_UNITS,
    ApexQwenImageTransformer2DModel,
    ApexSanaTransformer2DModel,
)
from megatron_apex.inference.samplers import METHODS, sample


def _host_noise(shape, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Float32 noise drawn on the host, as ``samplers.sample_seeded`` draws it: the same seed gives
    the same images as tools/sample.py, on any device. The samplers draw their fresh noise
    (renoise, release) from the same CPU generator."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (all noise is drawn on the host), got one on "
                         f"{generator.device}")
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _full_mask(mask: Optional[torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    return mask.to(device=embeds.device).bool()


def _pad_text(embeds: torch.Tensor, mask: torch.Tensor, length: int):
    """Right-pad text states (masked out) to ``length`` tokens: cond and uncond then run as one
    batch, and a masked trailing token changes no valid token's result."""
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds, mask
    return (torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


def _run_samplers(velocity, noise, embeds, mask, uncond_embeds, uncond_mask, steps: int, method: str,
                  generator, guidance_scale: float) -> torch.Tensor:
    """``samplers.sample`` with the pipeline's text states; guidance pads cond and uncond to one length."""
    mask = _full_mask(mask, embeds)
    extra = {}
    if guidance_scale != 1.0:
        uncond_mask = _full_mask(uncond_mask, uncond_embeds)
        length = max(embeds.shape[1], uncond_embeds.shape[1])
        embeds, mask = _pad_text(embeds, mask, length)
        uncond_embeds, uncond_mask = _pad_text(uncond_embeds, uncond_mask, length)
        extra = dict(uncond_context=uncond_embeds, uncond_mask=uncond_mask)
    return sample(velocity, noise, embeds, mask, nfe=steps, method=method, generator=generator,
                  guidance_scale=guidance_scale, **extra)


def _check_sampling_args(cls_name: str, steps: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{cls_name}: method={method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{cls_name}: num_inference_steps must be a positive integer (the NFE), got {steps!r}")


class _ApexPipelineMixin:
    """What both APEX pipelines add to their stock class: the APEX transformer class on load,
    and the trained target-time embedder with a LoRA."""

    _STOCK_TRANSFORMER: type
    _APEX_TRANSFORMER: type

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # model_index.json keeps the stock transformer entry (stock pipelines load the folder
        # without us); this pipeline loads that folder with the APEX class, which reads the
        # target-time embedder the stock class would drop.
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        entry = init_dict.get("transformer")
        if isinstance(entry, (list, tuple)) and list(entry) == ["diffusers", cls._STOCK_TRANSFORMER.__name__]:
            init_dict["transformer"] = [cls._APEX_TRANSFORMER.__module__, cls._APEX_TRANSFORMER.__name__]
        return init_dict, unused, hidden

    def _apex_transformer(self):
        if not isinstance(self.transformer, self._APEX_TRANSFORMER):
            raise ValueError(f"{type(self).__name__} needs an {self._APEX_TRANSFORMER.__name__}, got "
                             f"{type(self.transformer).__name__}; load the folder with "
                             f"{type(self).__name__}.from_pretrained (or pass transformer="
                             f"{self._APEX_TRANSFORMER.__name__}.from_pretrained(...))")
        return self.transformer

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """The stock LoRA loader, then the trained target-time embedder (and other trained full
        weights) from ``apex_extras.safetensors`` beside the LoRA file (tools/export_lora.py writes
        it there; a stock pipeline ignores it). They replace the transformer's own: full weights,
        not low-rank deltas, so unloading, fusing or scaling the adapter leaves them in place."""
        transformer = self._apex_transformer()
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)):
            folder = str(source) if os.path.isdir(source) else os.path.dirname(str(source))
            side = os.path.join(folder, EXTRAS_NAME)
            if os.path.isfile(side):
                transformer.load_apex_extras(load_file(side), side)


class ApexQwenImagePipeline(_ApexPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` sampling with our samplers: ``num_inference_steps`` is the NFE (1: the
    trained jump z - F(z, 1, c, tt = 0)), ``method`` one of flowmap (default), euler, renoise,
    release, ``guidance_scale`` classifier-free guidance as tools/sample.py applies it (1 = off;
    the unconditional states come from ``negative_prompt``, default the empty prompt). The
    scheduler is not used. ``latents`` are packed, as the stock pipeline takes and returns them
    (p x p patches of the transformer's ``patch_size``; the stock pipeline knows only 2)."""

    _STOCK_TRANSFORMER = QwenImageTransformer2DModel
    _APEX_TRANSFORMER = ApexQwenImageTransformer2DModel

    @staticmethod
    def _pack(x: torch.Tensor, p: int) -> torch.Tensor:
        """(B, C, H, W) -> (B, (H/p)(W/p), C p p): the stock ``_pack_latents`` for any patch size
        (the stock pipeline's is 2x2 only; our small models use others)."""
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    @staticmethod
    def _unpack(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
        b, _, d = tokens.shape
        x = tokens.reshape(b, h // p, w // p, d // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // (p * p), h, w)

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 1, method: str = "flowmap", guidance_scale: float = 1.0,
                 num_images_per_prompt: int = 1, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[torch.Tensor] = None,
                 prompt_embeds_mask: Optional[torch.Tensor] = None,
                 negative_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_prompt_embeds_mask: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True, attention_kwargs: Optional[dict] = None, max_sequence_length: int = 512):
        _check_sampling_args(type(self).__name__, num_inference_steps, method)
        transformer = self._apex_transformer()
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                          max_sequence_length=max_sequence_length)
        device = self._execution_device
        embeds, mask = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds,
                                          prompt_embeds_mask=prompt_embeds_mask, device=device,
                                          num_images_per_prompt=num_images_per_prompt,
                                          max_sequence_length=max_sequence_length)
        uncond, uncond_mask = None, None
        if guidance_scale != 1.0:
            if negative_prompt_embeds is None and negative_prompt is None:
                negative_prompt = [""] * (embeds.shape[0] // num_images_per_prompt)
            uncond, uncond_mask = self.encode_prompt(prompt=negative_prompt, prompt_embeds=negative_prompt_embeds,
                                                     prompt_embeds_mask=negative_prompt_embeds_mask, device=device,
                                                     num_images_per_prompt=num_images_per_prompt,
                                                     max_sequence_length=max_sequence_length)

        p = transformer.config.patch_size
        h = p * (int(height) // (self.vae_scale_factor * p))
        w = p * (int(width) // (self.vae_scale_factor * p))
        channels = transformer.config.in_channels // (p * p)
        if latents is None:
            noise = _host_noise((embeds.shape[0], channels, h, w), generator)
        else:
            noise = self._unpack(latents.float().cpu(), h, w, p)
        dtype = transformer.dtype

        def velocity(x, t, context, context_mask, t_target=None):
            out = transformer(hidden_states=self._pack(x.to(dtype), p), timestep=t.to(dtype),
                              target_timestep=None if t_target is None else t_target.to(dtype),
                              encoder_hidden_states=context.to(dtype), encoder_hidden_states_mask=context_mask,
                              img_shapes=[[(1, h // p, w // p)]] * x.shape[0], attention_kwargs=attention_kwargs or {},
                              return_dict=False)[0]
            return self._unpack(out.float(), h, w, p)

        x = _run_samplers(velocity, noise.to(device), embeds, mask, uncond, uncond_mask, num_inference_steps,
                          method, generator, guidance_scale)
        if output_type == "latent":
            image = self._pack(x, p)
        else:
            image = self._decode(x, output_type)
        self.maybe_free_model_hooks()
        return QwenImagePipelineOutput(images=image) if return_dict else (image,)

    def _decode(self, x: torch.Tensor, output_type: str):
        """The stock pipeline's decoding: un-normalise with the VAE's latent statistics, decode frame 0."""
        latents = x[:, :, None].to(self.vae.dtype)  # (B, C, 1, H, W): one video frame
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = self.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type=output_type)


_SANA_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class ApexSanaPipeline(_ApexPipelineMixin, SanaPipeline):
    """``SanaPipeline`` sampling with our samplers: ``num_inference_steps`` is the NFE (1: the
    trained jump z - F(z, 1, c, tt = 0)), ``method`` one of flowmap (default), euler, renoise,
    release, ``guidance_scale`` classifier-free guidance as tools/sample.py applies it (1 = off,
    the default here; the unconditional states come from ``negative_prompt``). The scheduler is
    not used."""

    _STOCK_TRANSFORMER = SanaTransformer2DModel
    _APEX_TRANSFORMER = ApexSanaTransformer2DModel

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt: str = "", num_inference_steps: int = 1, method: str = "flowmap",
                 guidance_scale: float = 1.0, num_images_per_prompt: int = 1, height: int = 1024, width: int = 1024,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, prompt_attention_mask: Optional[torch.Tensor] = None,
                 negative_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_prompt_attention_mask: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True, clean_caption: bool = False, use_resolution_binning: bool = True,
                 attention_kwargs: Optional[dict] = None, max_sequence_length: int = 300,
                 complex_human_instruction=_SANA_INSTRUCTION):
        _check_sampling_args(type(self).__name__, num_inference_steps, method)
        transformer = self._apex_transformer()
        if use_resolution_binning:
            orig_height, orig_width = height, width
            height, width = self.image_processor.classify_height_width_bin(height, width,
                                                                           ratios=self._aspect_ratio_bin())
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          prompt_attention_mask, negative_prompt_attention_mask)
        device = self._execution_device
        guided = guidance_scale != 1.0
        lora_scale = (attention_kwargs or {}).get("scale")
        embeds, mask, uncond, uncond_mask = self.encode_prompt(
            prompt, guided, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length,
            complex_human_instruction=complex_human_instruction, lora_scale=lora_scale)

        channels = transformer.config.in_channels
        shape = (embeds.shape[0], channels, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        noise = _host_noise(shape, generator) if latents is None else latents.float().cpu()
        dtype = transformer.dtype
        learned_sigma = transformer.config.out_channels // 2 == channels

        def velocity(x, t, context, context_mask, t_target=None):
            units = SANA_TIMESTEP_UNITS
            out = transformer(x.to(dtype), encoder_hidden_states=context.to(dtype),
                              encoder_attention_mask=context_mask, timestep=(t * units).to(dtype),
                              target_timestep=None if t_target is None else (t_target * units).to(dtype),
                              attention_kwargs=attention_kwargs, return_dict=False)[0].float()
            return out.chunk(2, dim=1)[0] if learned_sigma else out

        x = _run_samplers(velocity, noise.to(device), embeds, mask, uncond, uncond_mask, num_inference_steps,
                          method, generator, guidance_scale)
        if output_type == "latent":
            image = x
        else:
            image = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            if use_resolution_binning:
                image = self.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return SanaPipelineOutput(images=image) if return_dict else (image,)

    def _aspect_ratio_bin(self):
        bins = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
                16: "ASPECT_RATIO_512_BIN"}
        size = self.transformer.config.sample_size
        if size not in bins:
            raise ValueError(f"use_resolution_binning: no resolution bins for sample_size {size}; pass "
                             "use_resolution_binning=False")
        return getattr(pipeline_sana, bins[size])
