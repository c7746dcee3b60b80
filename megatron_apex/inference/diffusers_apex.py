"""diffusers classes that sample APEX models the way our tools do.

A stock ``QwenImagePipeline`` / ``SanaPipeline`` computes F(x, t, c) with tt = t: it never uses
the any-step target-time embedder an APEX model was trained with, so its one step is the
velocity head's Euler step, not the trained jump z - F(z, 1, c, tt = 0). This module adds:

- ``ApexQwenImageTransformer2DModel`` / ``ApexSanaTransformer2DModel``: the stock transformers
  plus the second timestep embedder (``time_text_embed_2`` / ``time_embed_2``, the names our
  export writes), used as our models use it: emb(t) + emb_2(tt) * (t - tt), in the units of the
  stock ``timestep`` argument. ``forward(..., target_timestep=None)``: None means tt = t, which
  is exactly the stock class.
- ``ApexQwenImagePipeline`` / ``ApexSanaPipeline``: the stock pipelines whose ``__call__`` runs
  ``megatron_apex.inference.samplers`` (``method`` flowmap / euler / renoise / release;
  ``num_inference_steps`` = NFE) instead of the scheduler, and whose ``load_lora_weights`` also
  loads the trained target-time embedder that ``tools/export_lora.py`` writes beside the LoRA.

Loading an exported pipeline folder (``tools/convert_hf.py export --base-pipeline``): its
``model_index.json`` names ``ApexQwenImagePipeline`` (``ApexSanaPipeline``) and keeps the stock
transformer entry. Importing this module registers the two pipeline classes in the ``diffusers``
namespace, where ``DiffusionPipeline.from_pretrained`` looks ``_class_name`` up, and the APEX
pipelines load their transformer with the APEX class. diffusers 0.42 imports no module a
folder names, so some import of ours has to come first either way; without it
``DiffusionPipeline.from_pretrained`` fails naming the class instead of quietly sampling with
the stock step. Stock ``QwenImagePipeline.from_pretrained(folder)`` still loads the folder (its
transformer ignores the extra keys).
"""

from __future__ import annotations

import inspect
import os
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

import diffusers
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel, SanaPipeline, SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers finds a component's load method here)
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput

from megatron_apex.inference.samplers import METHODS, sample

# The side file of convert_hf.py export --extras separate and of a LoRA export (conversion.hf_io.EXTRAS_NAME).
EXTRAS_NAME = "apex_extras.safetensors"
_SANA_TIMESTEP_UNITS = 1000.0  # Sana's pipelines pass timestep = 1000 * sigma


# ============================================================================ transformers
class _AnyStepTimeMixin:
    """The target-time term of an APEX transformer, added to the stock time embedding by a
    forward hook so the stock ``forward`` runs unchanged (and keeps working across diffusers
    versions). ``_TARGET`` is the embedder's attribute name, ``_time_units`` the stock
    ``timestep`` per unit of sigma."""

    _TARGET: str
    _time_units: float = 1.0
    _pending_target: Optional[torch.Tensor] = None

    def _install_target_time_embedder(self, enabled: bool) -> None:
        self._pending_target = None
        if enabled:
            setattr(self, self._TARGET, self._new_target_time_embedder())
        self._hooked_time_module().register_forward_hook(self._add_target_time_term, with_kwargs=True)

    @property
    def has_target_time_embedder(self) -> bool:
        return hasattr(self, self._TARGET)

    def _add_target_time_term(self, module, args, kwargs, output):
        tt = self._pending_target
        if tt is None:
            return output
        t = args[0] if args else kwargs["timestep"]
        tt = tt.to(device=t.device, dtype=t.dtype).expand(t.shape)
        embedded = self._embed_target_time(tt, output.dtype)
        step = ((t.float() - tt.float()) / self._time_units).to(output.dtype)[:, None]
        return output + embedded * step

    def _forward_with_target(self, forward, args, kwargs, target_timestep):
        timestep = inspect.signature(forward).bind_partial(*args, **kwargs).arguments["timestep"]
        if target_timestep is not None and not self.has_target_time_embedder:
            if torch.equal(torch.as_tensor(target_timestep, device=timestep.device).to(timestep.dtype).expand(
                    timestep.shape), timestep):
                target_timestep = None
            else:
                raise ValueError(f"target_timestep differs from timestep but this {type(self).__name__} has no "
                                 f"target-time embedder ({self._TARGET}: its folder had none)")
        self._pending_target = None if target_timestep is None else torch.as_tensor(target_timestep)
        try:
            return forward(*args, **kwargs)
        finally:
            self._pending_target = None

    def load_target_time_embedder(self, state_dict: Mapping[str, torch.Tensor], source: str) -> List[str]:
        """Load ``{<_TARGET>.<param>: tensor}`` (diffusers names) into the embedder, creating it
        when the model has none (a stock base under an APEX LoRA); every key is consumed."""
        prefix = f"{self._TARGET}."
        foreign = sorted(k for k in state_dict if not k.startswith(prefix))
        if foreign:
            raise ValueError(f"{source}: key {foreign[0]!r} is not a {self._TARGET} parameter")
        if not self.has_target_time_embedder:
            reference = next(self._hooked_time_module().parameters())
            setattr(self, self._TARGET, self._new_target_time_embedder().to(reference.device, reference.dtype))
            self.register_to_config(target_time_embedder=True)
        target = getattr(self, self._TARGET)
        ours = {f"{prefix}{k}": v for k, v in target.state_dict().items()}
        missing = sorted(set(ours) - set(state_dict))
        wrong = sorted(f"{k} {list(state_dict[k].shape)} (model {list(ours[k].shape)})" for k in ours
                       if k in state_dict and tuple(state_dict[k].shape) != tuple(ours[k].shape))
        if missing or wrong:
            raise ValueError(f"{source}: the target-time embedder does not fit the model: "
                             + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                         + ([f"shapes {', '.join(wrong)}"] if wrong else [])))
        # the stock time embedder's device and dtype: a loader that builds on the meta device
        # leaves keys the weights lack (a side file's) there, so ``assign`` replaces, not copies
        reference = next(self._hooked_time_module().parameters())
        with torch.no_grad():
            target.load_state_dict({k[len(prefix):]: v.to(reference.device, reference.dtype).clone()
                                    for k, v in state_dict.items()}, assign=True)
        return sorted(state_dict)

    @torch.no_grad()
    def load_apex_extras(self, state_dict: Mapping[str, torch.Tensor], source: str) -> List[str]:
        """A LoRA export's side file: the target-time embedder (``load_target_time_embedder``)
        and any other trained full weight, by its diffusers name (under a PEFT-wrapped module,
        its ``base_layer``). Every key must fit; returns the keys loaded."""
        prefix = f"{self._TARGET}."
        target = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        loaded = self.load_target_time_embedder(target, source) if target else []
        params = dict(self.named_parameters())
        for key in sorted(set(state_dict) - set(target)):
            module, _, leaf = key.rpartition(".")
            param = params.get(key, params.get(f"{module}.base_layer.{leaf}"))
            if param is None:
                raise ValueError(f"{source}: key {key!r} is no parameter of {type(self).__name__}")
            if tuple(param.shape) != tuple(state_dict[key].shape):
                raise ValueError(f"{source}: {key} has shape {list(state_dict[key].shape)}, the model "
                                 f"{list(param.shape)}")
            param.copy_(state_dict[key].to(param.device, param.dtype))
            loaded.append(key)
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The stock loader, with the target-time embedder when the folder has one: in the weights
        (``--extras inline``) or in ``apex_extras.safetensors`` (``--extras separate``). Local
        folders only (a pipeline loader hands its components over as such)."""
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if not os.path.isdir(folder):
            raise ValueError(f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): not a local "
                             "folder; download it first (huggingface_hub.snapshot_download)")
        inline, side = _target_keys_in(folder, f"{cls._TARGET}.")
        if inline and side:
            raise ValueError(f"{folder}: {cls._TARGET} is both in the weights and in {EXTRAS_NAME}")
        kwargs.setdefault("target_time_embedder", bool(inline or side))
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if side and model.has_target_time_embedder:
            model.load_target_time_embedder(_read_safetensors(os.path.join(folder, EXTRAS_NAME), side),
                                            os.path.join(folder, EXTRAS_NAME))
        return model


def _target_keys_in(folder: str, prefix: str):
    """(the embedder's keys in the folder's weights, its keys in apex_extras.safetensors), from
    the safetensors headers alone."""
    from megatron_apex.conversion import hf_io

    def keys(names):
        found = []
        for name in names:
            _, header = hf_io.read_safetensors_header(hf_io.input_file(folder, name, "--hf-path"), "--hf-path")
            found += [k for k in header if k.startswith(prefix)]
        return found

    side = keys([EXTRAS_NAME]) if os.path.isfile(os.path.join(folder, EXTRAS_NAME)) else []
    try:
        inline = keys(hf_io.weight_files(folder, "--hf-path"))
    except FileNotFoundError:
        inline = []  # no safetensors: the stock loader says what it misses
    return inline, side


def _read_safetensors(path: str, keys) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}


class ApexQwenImageTransformer2DModel(_AnyStepTimeMixin, QwenImageTransformer2DModel):
    """``QwenImageTransformer2DModel`` + ``time_text_embed_2``; ``target_timestep`` in the units of
    ``timestep`` (sigma in [0, 1], what QwenImagePipeline passes)."""

    _TARGET = "time_text_embed_2"

    @register_to_config
    def __init__(self, patch_size: int = 2, in_channels: int = 64, out_channels: Optional[int] = 16,
                 num_layers: int = 60, attention_head_dim: int = 128, num_attention_heads: int = 24,
                 joint_attention_dim: int = 3584, guidance_embeds: bool = False, axes_dims_rope=(16, 56, 56),
                 zero_cond_t: bool = False, use_additional_t_cond: bool = False, use_layer3d_rope: bool = False,
                 target_time_embedder: bool = True):
        # time conditioning our models do not have (and where the target-time term would go differently)
        for name, value in (("guidance_embeds", guidance_embeds), ("zero_cond_t", zero_cond_t),
                            ("use_additional_t_cond", use_additional_t_cond)):
            if value:
                raise ValueError(f"{type(self).__name__}: config sets {name}=True, which APEX models do not have")
        super().__init__(patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
                         num_layers=num_layers, attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
                         guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope, zero_cond_t=zero_cond_t,
                         use_additional_t_cond=use_additional_t_cond, use_layer3d_rope=use_layer3d_rope)
        self._install_target_time_embedder(target_time_embedder)

    def _new_target_time_embedder(self) -> nn.Module:
        return QwenTimestepProjEmbeddings(embedding_dim=self.inner_dim)

    def _hooked_time_module(self) -> nn.Module:
        return self.time_text_embed

    def _embed_target_time(self, tt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        target = self.time_text_embed_2
        return target.timestep_embedder(target.time_proj(tt).to(dtype))

    def forward(self, *args, target_timestep: Optional[torch.Tensor] = None, **kwargs):
        return self._forward_with_target(super().forward, args, kwargs, target_timestep)


class _SanaTargetTimeEmbedder(nn.Module):
    """``time_embed_2.emb.timestep_embedder``: the timestep half of Sana's ``AdaLayerNormSingle``."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(dim, size_emb_dim=dim // 3,
                                                              use_additional_conditions=False)


class ApexSanaTransformer2DModel(_AnyStepTimeMixin, SanaTransformer2DModel):
    """``SanaTransformer2DModel`` + ``time_embed_2``; ``target_timestep`` in the units of
    ``timestep`` (1000 * sigma, what SanaPipeline passes)."""

    _TARGET = "time_embed_2"
    _time_units = _SANA_TIMESTEP_UNITS

    @register_to_config
    def __init__(self, in_channels: int = 32, out_channels: Optional[int] = 32, num_attention_heads: int = 70,
                 attention_head_dim: int = 32, num_layers: int = 20, num_cross_attention_heads: Optional[int] = 20,
                 cross_attention_head_dim: Optional[int] = 112, cross_attention_dim: Optional[int] = 2240,
                 caption_channels: int = 2304, mlp_ratio: float = 2.5, dropout: float = 0.0,
                 attention_bias: bool = False, sample_size: int = 32, patch_size: int = 1,
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale: Optional[int] = None, guidance_embeds: bool = False,
                 guidance_embeds_scale: float = 0.1, qk_norm: Optional[str] = None, timestep_scale: float = 1.0,
                 target_time_embedder: bool = True):
        if guidance_embeds:
            raise ValueError(f"{type(self).__name__}: config sets guidance_embeds=True (Sana-Sprint), which APEX "
                             "models do not have")
        if timestep_scale != 1.0:
            raise ValueError(f"{type(self).__name__}: config sets timestep_scale={timestep_scale}; APEX models "
                             "take timestep = 1000 * sigma")
        super().__init__(in_channels=in_channels, out_channels=out_channels, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, num_layers=num_layers,
                         num_cross_attention_heads=num_cross_attention_heads,
                         cross_attention_head_dim=cross_attention_head_dim, cross_attention_dim=cross_attention_dim,
                         caption_channels=caption_channels, mlp_ratio=mlp_ratio, dropout=dropout,
                         attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
                         norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                         interpolation_scale=interpolation_scale, guidance_embeds=guidance_embeds,
                         guidance_embeds_scale=guidance_embeds_scale, qk_norm=qk_norm, timestep_scale=timestep_scale)
        self._install_target_time_embedder(target_time_embedder)

    def _new_target_time_embedder(self) -> nn.Module:
        return _SanaTargetTimeEmbedder(self.config.num_attention_heads * self.config.attention_head_dim)

    def _hooked_time_module(self) -> nn.Module:
        # the embedded timestep, before adaLN-single's linear: both the blocks' t6 and the final
        # modulation see emb(t) + emb_2(tt) * (t - tt), as in SanaModel._embed_time
        return self.time_embed.emb

    def _embed_target_time(self, tt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = self.time_embed_2.emb
        return emb.timestep_embedder(emb.time_proj(tt).to(dtype))

    def forward(self, *args, target_timestep: Optional[torch.Tensor] = None, **kwargs):
        return self._forward_with_target(super().forward, args, kwargs, target_timestep)


# ============================================================================ pipelines
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
            init_dict["transformer"] = [__name__, cls._APEX_TRANSFORMER.__name__]
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
                from safetensors.torch import load_file

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
            units = _SANA_TIMESTEP_UNITS
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
        from diffusers.pipelines.sana import pipeline_sana

        bins = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
                16: "ASPECT_RATIO_512_BIN"}
        size = self.transformer.config.sample_size
        if size not in bins:
            raise ValueError(f"use_resolution_binning: no resolution bins for sample_size {size}; pass "
                             "use_resolution_binning=False")
        return getattr(pipeline_sana, bins[size])


# ============================================================================ registration
PIPELINES = {QwenImagePipeline.__name__: ApexQwenImagePipeline, SanaPipeline.__name__: ApexSanaPipeline}


def _register() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` find our pipelines: it looks a folder's
    ``_class_name`` up as an attribute of the ``diffusers`` module and nowhere else."""
    for cls in PIPELINES.values():
        if getattr(diffusers, cls.__name__, None) is None:
            setattr(diffusers, cls.__name__, cls)


_register()
