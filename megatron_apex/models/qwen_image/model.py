"""Qwen-Image dual-stream MMDiT on megatron-core, with APEX's condition shift and an
any-step target-time input.

Contract: ``model(x_t, t, context, context_mask=None, fake_condition=False, t_target=None)``
returns the velocity with the shape of ``x_t`` (B, C, H, W); ``t`` in [0, 1], 1 = noise.
With ``fake_condition`` False and ``t_target`` None it computes exactly diffusers'
``QwenImageTransformer2DModel`` on the packed latents.

Pipeline stages: ``pre_process`` owns the input embeddings (image, text, condition shift,
time), ``post_process`` the final adaLN and projection. Between stages one tensor
[L + N + 1, B, D] travels: text tokens, image tokens, then the time embedding as a last row
(a transport layout only: inside each block the joint attention orders image before text,
see ``layers.join_streams``).

Sequence parallelism (``sequence_parallel=True``, TP > 1; models/common/sequence_parallel.py):
each stream is split over the TP ranks on its own, so every rank holds N / TP image and
L' / TP text tokens between the blocks' parallel linears (and sends those, with the time row,
between pipeline stages). The image token count must divide by TP; the text is padded with
masked trailing tokens to L' (a multiple of TP), which changes no real token's result (a
masked key gets exactly zero attention). The velocity is gathered after ``proj_out``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_apex.models.common.condition_shift import ConditionShift, FakeCondition
from megatron_apex.models.common.inputs import check_model_inputs
from megatron_apex.models.common.modulation import AdaLNModulation, modulate
from megatron_apex.models.common.norms import RMSNorm
from megatron_apex.models.common.rope import qwen_image_rope_angles
from megatron_apex.models.common.sequence_parallel import (check_image_tokens, gather_sequence, mark_sequence_parallel,
                                                           padded_length, scatter_sequence)
from megatron_apex.models.common.staged_dit import StagedDiT
from megatron_apex.models.common.timestep import TimestepEmbedder
from megatron_apex.models.qwen_image.config import QwenImageConfig
from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec
from megatron_apex.models.qwen_image.layers import SDPAttention, join_streams, zeros_init


def pack_latents(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p), channel order (c, py, px): diffusers'
    ``QwenImagePipeline._pack_latents``."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`."""
    b, n, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class QwenImageModel(StagedDiT):
    """See the module docstring. ``spec`` defaults to ``get_qwen_image_layer_spec("auto")``;
    ``layer_range`` = (first, stop) global layer indices overrides megatron's per-stage split.

    Initialisation (``init_style="dit"``, applied when ``perform_initialization``):
    xavier-uniform weights and zero biases for every linear in the blocks (fused QKV as one
    matrix, as DiT does) and for ``img_in`` / ``txt_in``; N(0, ``init_std``) for the timestep
    embedders' weights; adaLN-Zero: block modulations, the final modulation and ``proj_out``
    start at zero, so every block starts as the identity and the output starts at 0; norm
    weights 1; the target-time embedder per ``target_time_init``; the condition shift at
    ``A = a, b = b``. Megatron builds each tensor-parallel weight from a full-size master on
    the CPU, so every TP size gets the same weights from the same seed.
    """

    def __init__(self, config: QwenImageConfig, spec: Optional[ModuleSpec] = None,
                 pre_process: bool = True, post_process: bool = True,
                 layer_range: Optional[tuple] = None, sequence_parallel: bool = False):
        super().__init__(config, spec if spec is not None else get_qwen_image_layer_spec("auto"),
                         pre_process, post_process, sequence_parallel)
        transformer_config = self.config  # megatron's TransformerConfig (config: ours)
        hidden = config.hidden_size
        dtype = config.torch_dtype

        if pre_process:
            self.img_in = nn.Linear(config.in_channels, hidden, dtype=dtype)
            self.txt_norm = RMSNorm(transformer_config, config.joint_attention_dim, eps=config.norm_eps)
            self.txt_in = nn.Linear(config.joint_attention_dim, hidden, dtype=dtype)
            shift_dim = config.joint_attention_dim if config.shift_site == "input" else hidden
            self.condition_shift = ConditionShift(
                shift_dim, kind=config.shift_kind, a=config.shift_a, b=config.shift_b,
                learnable=config.shift_learnable,
            ).to(dtype)
            self.time_embedder = TimestepEmbedder(hidden, config.timestep_channels, dtype=dtype)
            if config.target_time_embedder:
                self.target_time_embedder = TimestepEmbedder(hidden, config.timestep_channels, dtype=dtype)

        self.layers = self._build_layers(layer_range, tp_group=self.tp_group, cp_group=self.cp_group)

        # Transformer Engine's DotProductAttention may read the padding mask as per-sample
        # lengths (its cuDNN kernel); our SDPAttention honours every mask by position.
        self.padding_read_as_lengths = any(
            not isinstance(layer.attention.core_attention, SDPAttention) for layer in self.layers)

        if post_process:
            self.final_modulation = AdaLNModulation(
                transformer_config, self.spec.submodules.modulation_linear, hidden, 2, zeros_init, self.tp_group
            )
            self.final_norm = build_module(self.spec.submodules.adaln_norm, config=transformer_config,
                                           hidden_size=hidden, eps=config.norm_eps)
            self.proj_out = nn.Linear(hidden, config.patch_size ** 2 * config.out_channels, dtype=dtype)
            if sequence_parallel:  # applied to this rank's tokens, gathered after
                mark_sequence_parallel(self.proj_out)

        if config.perform_initialization:
            self._init_replicated_weights()

    # ------------------------------------------------------------------ construction helpers
    @torch.no_grad()
    def _init_replicated_weights(self):
        """DiT-style init of the modules megatron does not initialise (see class docstring)."""
        cfg = self.model_config
        if self.pre_process:
            for linear in (self.img_in, self.txt_in):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
            for linear in (self.time_embedder.linear_1, self.time_embedder.linear_2):
                nn.init.normal_(linear.weight, std=cfg.init_std)
                nn.init.zeros_(linear.bias)
        self._init_target_time_and_head()

    # ------------------------------------------------------------------ pipeline plumbing
    def stage_tensor_shape(self, batch_size: int, text_len: int, height: int, width: int) -> tuple:
        """Shape of the tensor this rank sends between pipeline stages (under sequence
        parallelism its share of each stream, and the time row)."""
        p = self.model_config.patch_size
        sp = self.sp_size
        tokens = padded_length(text_len, sp) // sp + (height // p) * (width // p) // sp
        return (tokens + 1, batch_size, self.model_config.hidden_size)

    # ------------------------------------------------------------------ forward pieces
    def _check_inputs(self, x_t, t, context, context_mask, t_target):
        cfg = self.model_config
        return check_model_inputs(x_t, t, context, context_mask, t_target, channels=cfg.out_channels,
                                  channels_flag="--out-channels", patch_size=cfg.patch_size,
                                  context_dim=cfg.joint_attention_dim, context_flag="--joint-attention-dim")

    def _project_text(self, context):
        return self.txt_in(self.txt_norm(context))

    @staticmethod
    def _attention_mask(context_mask, num_image_tokens):
        """[B, 1, 1, N + L] bool in the joint order (image, then text: ``join_streams``),
        True = masked out (megatron / TE convention); None = no mask."""
        if context_mask is None:
            return None
        keep_text = context_mask.bool() if context_mask.dtype != torch.bool else context_mask
        keep_image = keep_text.new_ones(keep_text.shape[0], num_image_tokens)
        return ~join_streams(keep_image, keep_text, dim=1)[:, None, None, :]

    @staticmethod
    def _pad_text_mask(context_mask, batch: int, text_len: int, text_rows: int, device):
        """The caption mask over ``text_rows`` >= L tokens: the padding past L masked out."""
        if text_rows == text_len:
            return context_mask
        keep = (torch.ones(batch, text_len, dtype=torch.bool, device=device) if context_mask is None
                else context_mask.bool())
        return F.pad(keep, (0, text_rows - text_len), value=False)

    def _check_text_padding_trails(self, context_mask):
        """Length-based kernels are exact only when every caption's valid tokens come first
        (right padding, what the loaders and text encoders produce); a hole would move the
        mask onto valid tokens silently, so it is an error here."""
        if context_mask is None or not self.padding_read_as_lengths:
            return
        keep = context_mask.bool()
        if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
            raise ValueError("context_mask has a valid text token after a padded one; Transformer Engine's "
                             "attention reads the mask as per-caption lengths, so captions must be right-padded "
                             "(or use --attention-backend local)")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None, fake_condition: FakeCondition = False,
                t_target: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.model_config
        t, t_target = self._check_inputs(x_t, t, context, context_mask, t_target)
        _, _, height, width = x_t.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p
        text_len = context.shape[1]
        num_image = grid_h * grid_w
        dtype = self.config.params_dtype
        sp = self.sp_size
        if self.sequence_parallel:
            check_image_tokens(num_image, grid_h, grid_w, sp)
        text_rows = padded_length(text_len, sp)  # L' (= L without sequence parallelism)

        if self.pre_process:
            img = self.img_in(pack_latents(x_t.to(dtype), p))
            txt = self._embed_text(context.to(dtype), fake_condition)
            temb = self._any_step_time(t, t_target)
            img = img.transpose(0, 1).contiguous()
            txt = txt.transpose(0, 1).contiguous()
            if self.sequence_parallel:
                txt = F.pad(txt, (0, 0, 0, 0, 0, text_rows - text_len))
                img, txt = scatter_sequence(img, self.tp_group), scatter_sequence(txt, self.tp_group)
        else:
            stage = self._stage_input(x_t.shape[0], text_len, height, width)
            local_text = text_rows // sp
            txt, img, temb = stage[:local_text], stage[local_text:-1], stage[-1]

        self._check_text_padding_trails(context_mask)
        text_mask = self._pad_text_mask(context_mask, x_t.shape[0], text_len, text_rows, x_t.device)
        attention_mask = self._attention_mask(text_mask, num_image)
        rope = qwen_image_rope_angles(grid_h, grid_w, text_rows, cfg.axes_dims_rope, cfg.rope_theta, img.device)
        silu_temb = F.silu(temb)
        for layer in self.layers:
            img, txt = layer(img, txt, silu_temb, rope, attention_mask)

        if not self.post_process:
            return torch.cat([txt, img, temb.unsqueeze(0)], dim=0)

        scale, shift = self.final_modulation(silu_temb)  # diffusers' AdaLayerNormContinuous order
        img = modulate(self.final_norm(img), shift, scale)
        out = self.proj_out(img)
        if self.sequence_parallel:
            out = gather_sequence(out, self.tp_group)
        return unpack_latents(out.transpose(0, 1), height, width, p).to(x_t.dtype)
