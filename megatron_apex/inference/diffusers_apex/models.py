"""The APEX transformers: the stock ``QwenImageTransformer2DModel`` / ``SanaTransformer2DModel``
plus the second timestep embedder (``time_text_embed_2`` / ``time_embed_2``, the names our export
writes), used as our models use it: emb(t) + emb_2(tt) * (t - tt), in the units of the stock
``timestep`` argument. ``forward(..., target_timestep=None)``: None means tt = t, which is
exactly the stock class. ``from_pretrained`` reads the embedder from the weights or from the
``apex_extras.safetensors`` side file.
"""

from __future__ import annotations

import inspect
import os
from typing import Dict, List, Mapping, Optional

import torch
from diffusers import QwenImageTransformer2DModel, SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers finds a component's load method here)
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from safetensors import safe_open
from torch import nn

from megatron_apex.conversion import hf_io

# The side file of convert_hf.py export --extras separate and of a LoRA export (conversion.hf_io.EXTRAS_NAME).
EXTRAS_NAME = "apex_extras.safetensors"
SANA_TIMESTEP_UNITS = 1000.0  # Sana's pipelines pass timestep = 1000 * sigma


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
    _time_units = SANA_TIMESTEP_UNITS

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
