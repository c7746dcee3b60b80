"""Sana linear-attention DiT on megatron-core, with APEX's condition shift and an any-step
target-time input.

Contract: ``model(x_t, t, context, context_mask=None, fake_condition=False, t_target=None)``
returns the velocity with the shape of ``x_t`` (B, C, H, W); ``t`` in [0, 1], 1 = noise.
With ``fake_condition`` False and ``t_target`` None it computes exactly diffusers'
``SanaTransformer2DModel`` called with ``timestep = 1000 * t`` (what Sana's flow pipelines
pass: timestep = 1000 * sigma), whose output is the same flow velocity (noise - data) that
``QwenImageModel`` returns.

Activations are batch-first inside the model (see ``layers.py``). Pipeline stages:
``pre_process`` owns the input embeddings (patches, caption, condition shift, time),
``post_process`` the final modulation and projection. Between stages one tensor
[L + N + 7, B, D] (megatron's sequence-first layout) travels: caption tokens, image tokens,
the six adaLN-single vectors t6, then the embedded timestep e.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_apex.models.common.condition_shift import ConditionShift, FakeCondition
from megatron_apex.models.common.config import gelu_tanh
from megatron_apex.models.common.inputs import check_model_inputs
from megatron_apex.models.common.modulation import modulate
from megatron_apex.models.common.norms import RMSNorm
from megatron_apex.models.common.staged_dit import StagedDiT
from megatron_apex.models.sana.config import SanaConfig
from megatron_apex.models.sana.layer_spec import get_sana_layer_spec
from megatron_apex.models.sana.layers import MASK_BIAS, SanaTimestepEmbedder, ScaleShiftTable

CAPTION_NORM_EPS = 1e-5  # diffusers' caption_norm
FINAL_NORM_EPS = 1e-6  # diffusers' norm_out (SanaModulatedNorm), whatever norm_eps is
TIME_ROWS = 7  # t6 (6 rows) and e (1 row) in the stage tensor


def patchify_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h*w, D), raster order (diffusers' ``PatchEmbed`` flatten)."""
    return x.flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """(B, N, p*p*C) with channels ordered (py, px, c) -> (B, C, H, W): diffusers' Sana unpatchify."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(b, height // p, width // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, -1, height, width)


class CaptionProjection(nn.Module):
    """diffusers' ``PixArtAlphaTextProjection``: linear -> GELU(tanh) -> linear. Replicated."""

    def __init__(self, in_features: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, dtype=dtype)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, dtype=dtype)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu_tanh(self.linear_1(caption)))


class SanaModel(StagedDiT):
    """See the module docstring. ``spec`` defaults to ``get_sana_layer_spec("auto")``;
    ``layer_range`` = (first, stop) global layer indices overrides megatron's per-stage split.

    Initialisation (``init_style="pixart"``, applied when ``perform_initialization``), as
    PixArt / Sana train from scratch: xavier-uniform weights and zero biases for every linear
    in the blocks (fused QKV as one matrix) and for the patch embedding (as a flattened
    linear); N(0, ``init_std``) for the timestep embedders, the adaLN-single linear and the
    caption projection; scale-shift tables randn / sqrt(D); the cross-attention output
    projections and ``proj_out`` start at zero, so the output starts at 0; caption-norm
    weight 1; the target-time embedder per ``target_time_init``; the condition shift at
    ``A = a, b = b``. Tensor-parallel weights come from full-size masters on the CPU, so
    every TP size gets the same weights from the same seed.
    """

    def __init__(self, config: SanaConfig, spec: Optional[ModuleSpec] = None,
                 pre_process: bool = True, post_process: bool = True,
                 layer_range: Optional[tuple] = None, sequence_parallel: bool = False):
        super().__init__(config, spec if spec is not None else get_sana_layer_spec("auto"),
                         pre_process, post_process, sequence_parallel)  # refuses sequence_parallel for Sana
        transformer_config = self.config  # megatron's TransformerConfig (config: ours)
        hidden = config.hidden_size
        dtype = config.torch_dtype
        p = config.patch_size

        if pre_process:
            self.patch_embed = nn.Conv2d(config.in_channels, hidden, kernel_size=p, stride=p, dtype=dtype)
            self.caption_projection = CaptionProjection(config.caption_channels, hidden, dtype)
            self.caption_norm = RMSNorm(transformer_config, hidden, eps=CAPTION_NORM_EPS)
            shift_dim = config.caption_channels if config.shift_site == "input" else hidden
            self.condition_shift = ConditionShift(
                shift_dim, kind=config.shift_kind, a=config.shift_a, b=config.shift_b,
                learnable=config.shift_learnable,
            ).to(dtype)
            self.time_embedder = SanaTimestepEmbedder(hidden, config.timestep_channels, dtype=dtype)
            if config.target_time_embedder:
                self.target_time_embedder = SanaTimestepEmbedder(hidden, config.timestep_channels, dtype=dtype)
            # adaLN-single: e -> six per-sample vectors shared by every block.
            self.time_modulation = build_module(
                self.spec.submodules.time_modulation_linear, hidden, 6 * hidden, config=transformer_config,
                init_method=self._normal_init, bias=True, gather_output=True, skip_bias_add=False,
                tp_group=self.tp_group,
            )

        self.layers = self._build_layers(layer_range, tp_group=self.tp_group,
                                         num_cross_attention_heads=config.num_cross_attention_heads,
                                         cross_attention_head_dim=config.cross_attention_head_dim,
                                         attention_bias=config.attention_bias)

        if post_process:
            self.final_modulation = ScaleShiftTable(transformer_config, 2, hidden)
            self.final_norm = build_module(self.spec.submodules.adaln_norm, config=transformer_config,
                                           hidden_size=hidden, eps=FINAL_NORM_EPS)
            self.proj_out = nn.Linear(hidden, p * p * config.out_channels, dtype=dtype)

        if config.perform_initialization:
            self._init_replicated_weights()

    # ------------------------------------------------------------------ construction helpers
    def _normal_init(self, weight: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(weight, std=self.model_config.init_std)

    @torch.no_grad()
    def _init_replicated_weights(self):
        """PixArt-style init of the modules megatron does not initialise (see class docstring)."""
        cfg = self.model_config
        if self.pre_process:
            nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
            nn.init.zeros_(self.patch_embed.bias)
            linears = (self.time_embedder.linear_1, self.time_embedder.linear_2,
                       self.caption_projection.linear_1, self.caption_projection.linear_2)
            for linear in linears:
                nn.init.normal_(linear.weight, std=cfg.init_std)
                nn.init.zeros_(linear.bias)
        self._init_target_time_and_head()

    # ------------------------------------------------------------------ pipeline plumbing
    def stage_tensor_shape(self, batch_size: int, text_len: int, height: int, width: int) -> tuple:
        """Shape of the tensor sent between pipeline stages, for the p2p schedule."""
        p = self.model_config.patch_size
        return (text_len + (height // p) * (width // p) + TIME_ROWS, batch_size, self.model_config.hidden_size)

    # ------------------------------------------------------------------ forward pieces
    def _check_inputs(self, x_t, t, context, context_mask, t_target):
        cfg = self.model_config
        return check_model_inputs(x_t, t, context, context_mask, t_target, channels=cfg.in_channels,
                                  channels_flag="--in-channels", patch_size=cfg.patch_size,
                                  context_dim=cfg.caption_channels, context_flag="--caption-channels")

    def _embed_time(self, t, t_target):
        """(t6 (B, 6D), e (B, D)): e = emb(t) [+ emb_2(tt) * (t - tt)], t6 = Linear(SiLU(e))."""
        e = self._any_step_time(t, t_target)
        t6, _ = self.time_modulation(F.silu(e))
        return t6, e

    def _project_text(self, context):
        return self.caption_norm(self.caption_projection(context))

    @staticmethod
    def _attention_bias(context_mask, dtype):
        """(B, 1, 1, L) additive bias, 0 where kept and -10000 where masked (diffusers); None = no mask."""
        if context_mask is None:
            return None
        keep = context_mask.to(dtype)
        return ((1 - keep) * MASK_BIAS)[:, None, None, :]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None, fake_condition: FakeCondition = False,
                t_target: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.model_config
        t, t_target = self._check_inputs(x_t, t, context, context_mask, t_target)
        batch, _, height, width = x_t.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p
        text_len = context.shape[1]
        dtype = self.config.params_dtype

        if self.pre_process:
            img = patchify_tokens(self.patch_embed(x_t.to(dtype))).contiguous()
            txt = self._embed_text(context.to(dtype), fake_condition)
            t6, e = self._embed_time(t, t_target)
        else:
            stage = self._stage_input(batch, text_len, height, width).transpose(0, 1)
            num_image = grid_h * grid_w
            txt, img = stage[:, :text_len], stage[:, text_len:text_len + num_image].contiguous()
            t6, e = stage[:, -TIME_ROWS:-1].reshape(batch, -1), stage[:, -1]

        bias = self._attention_bias(context_mask, img.dtype)
        for layer in self.layers:
            img = layer(img, txt, t6, bias, grid_h, grid_w)

        if not self.post_process:
            rows = torch.cat([txt, img, t6.reshape(batch, 6, -1), e.unsqueeze(1)], dim=1)
            return rows.transpose(0, 1).contiguous()

        shift, scale = self.final_modulation(e[:, None])  # diffusers' order: (shift, scale), from e
        img = modulate(self.final_norm(img), shift, scale)
        return unpatchify(self.proj_out(img), height, width, p).to(x_t.dtype)
