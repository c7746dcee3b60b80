"""The Qwen-Image dual-stream block, built from megatron-core pieces through a ModuleSpec.

Activations use megatron's [sequence, batch, hidden] layout. Every swappable piece
(linears, core attention, norms, MLP) comes from the spec: the block itself has no
backend branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_apex.models.common.attention import attention, check_kernel
from megatron_apex.models.common.modulation import AdaLNModulation, gated_residual, modulate
from megatron_apex.models.common.rope import apply_rope


def join_streams(image: torch.Tensor, text: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The joint attention sequence along ``dim``: image tokens, then text tokens.

    Image first so that text padding is TRAILING: Transformer Engine's cuDNN fused attention
    turns a padding mask into per-sample lengths (its ``get_cu_seqlens`` counts the unmasked
    tokens n) and attends over the FIRST n tokens of each sample. With text first, a padded
    prompt would mask the last image tokens instead of its padding. Each token keeps its own
    RoPE rotation (applied per stream before joining), and attention is equivariant to a
    permutation of its tokens, so the order changes nothing else."""
    return torch.cat([image, text], dim=dim)


def split_streams(joint: torch.Tensor, num_image: int, dim: int = 0) -> tuple:
    """(image, text): the inverse of :func:`join_streams`."""
    return joint.narrow(dim, 0, num_image), joint.narrow(dim, num_image, joint.shape[dim] - num_image)


def zeros_init(weight: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero (DiT): modulation starts at shift = scale = gate = 0, so blocks start as identity."""
    return torch.nn.init.zeros_(weight)


class SDPAttention(MegatronModule):
    """Local core attention: ``torch.nn.functional.scaled_dot_product_attention`` on the
    kernel ``attention_backend`` (models/common/attention.py: ``auto`` lets torch choose, or
    uses flash-attn for bf16/fp16 CUDA calls when installed; ``sdpa`` lets torch choose;
    ``flash``, ``fused``, ``unfused``, ``flash_attn`` force one). The padded-text mask keeps
    its meaning on every kernel.

    Same constructor and call signature as megatron's ``TEDotProductAttention`` (inputs
    [s, b, heads, head_dim], output [s, b, heads * head_dim], boolean ``attention_mask``
    [b, 1, 1, s_kv] with True = masked out) so a spec can swap the two.
    """

    def __init__(self, config, layer_number: int = 1, attn_mask_type=AttnMaskType.padding,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, attention_backend: str = "auto", **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_backend = check_kernel(attention_backend)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention supports neither attention_bias nor packed sequences")
        s, b, heads, head_dim = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        keep = None if attention_mask is None else ~attention_mask
        out = attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0,
                        scale=self.softmax_scale, kernel=self.attention_backend)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)


@dataclass
class JointAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    qk_norm: Union[ModuleSpec, type] = None


class JointAttention(MegatronModule):
    """Joint attention over [image, text] (:func:`join_streams`) with separate projections
    per stream.

    Fused QKV per stream (``ColumnParallelLinear``, ``gather_output=False``) in megatron's
    per-head layout: output channels are, for each head h, ``[q_h | k_h | v_h]`` of head_dim
    each, so a contiguous TP split keeps whole heads. Per-head weighted RMSNorm on q and k
    (named ``*q_layernorm`` / ``*k_layernorm`` so megatron's ``finalize_model_grads``
    all-reduces their grads over TP), 3-axis RoPE, one attention call on the concatenated
    sequence, then ``RowParallelLinear`` output projections per stream.
    """

    def __init__(self, config, submodules: JointAttentionSubmodules, layer_number: int = 1,
                 tp_group=None, cp_group=None):
        super().__init__(config=config)
        hidden = config.hidden_size
        self.head_dim = config.kv_channels

        def qkv(name):
            return build_module(
                submodules.linear_qkv, hidden, 3 * hidden, config=config,
                init_method=config.init_method, gather_output=False, bias=True,
                skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name, tp_group=tp_group,
            )

        def proj(name):
            return build_module(
                submodules.linear_proj, hidden, hidden, config=config,
                init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
                skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name, tp_group=tp_group,
            )

        def qk_norm():
            return build_module(submodules.qk_norm, config=config, hidden_size=self.head_dim,
                                eps=config.layernorm_epsilon)

        self.linear_qkv = qkv("qkv")
        self.linear_added_qkv = qkv("added_qkv")
        self.q_layernorm = qk_norm()
        self.k_layernorm = qk_norm()
        self.added_q_layernorm = qk_norm()
        self.added_k_layernorm = qk_norm()
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=AttnMaskType.padding, attention_type="self",
        )
        self.linear_proj = proj("proj")
        self.linear_added_proj = proj("added_proj")

    def _project(self, linear, q_norm, k_norm, x, angles):
        mixed, _ = linear(x)
        mixed = mixed.reshape(mixed.shape[0], mixed.shape[1], -1, 3 * self.head_dim)
        q, k, v = torch.split(mixed, self.head_dim, dim=-1)
        q = apply_rope(q_norm(q), angles)
        k = apply_rope(k_norm(k), angles)
        return q, k, v

    def forward(self, img, txt, rope, attention_mask):
        txt_angles, img_angles = rope
        iq, ik, iv = self._project(self.linear_qkv, self.q_layernorm, self.k_layernorm, img, img_angles)
        tq, tk, tv = self._project(self.linear_added_qkv, self.added_q_layernorm, self.added_k_layernorm,
                                   txt, txt_angles)
        q, k, v = join_streams(iq, tq), join_streams(ik, tk), join_streams(iv, tv)
        mask_type = AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding
        out = self.core_attention(q, k, v, attention_mask, attn_mask_type=mask_type)
        # the joint sequence's image tokens: all of them even when ``img`` holds one
        # sequence-parallel rank's share (the QKV linear gathered the rest)
        img_attn, txt_attn = split_streams(out, iq.shape[0])
        img_out, _ = self.linear_proj(img_attn)
        txt_out, _ = self.linear_added_proj(txt_attn)
        return img_out, txt_out


@dataclass
class QwenImageLayerSubmodules:
    modulation_linear: Union[ModuleSpec, type] = None
    adaln_norm: Union[ModuleSpec, type] = None
    attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class QwenImageLayer(MegatronModule):
    """One dual-stream block (diffusers' ``QwenImageTransformerBlock``).

    Per stream: modulation -> 6 chunks (shift1, scale1, gate1, shift2, scale2, gate2);
    x += gate1 * attn(modulate(LN(x))); x += gate2 * MLP(modulate(LN(x))).
    """

    def __init__(self, config, submodules: QwenImageLayerSubmodules, layer_number: int = 1,
                 tp_group=None, cp_group=None):
        super().__init__(config=config)
        self.layer_number = layer_number
        hidden = config.hidden_size

        def modulation():
            return AdaLNModulation(config, submodules.modulation_linear, hidden, 6, zeros_init, tp_group)

        def norm():
            return build_module(submodules.adaln_norm, config=config, hidden_size=hidden,
                                eps=config.layernorm_epsilon)

        def mlp():
            return build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size,
                                tp_group=tp_group)

        self.img_modulation = modulation()
        self.txt_modulation = modulation()
        self.img_norm1, self.img_norm2 = norm(), norm()
        self.txt_norm1, self.txt_norm2 = norm(), norm()
        self.attention = build_module(submodules.attention, config=config, layer_number=layer_number,
                                      tp_group=tp_group, cp_group=cp_group)
        self.img_mlp = mlp()
        self.txt_mlp = mlp()

    @staticmethod
    def _mlp(mlp, x):
        out, bias = mlp(x)
        return out if bias is None else out + bias

    def forward(self, img, txt, silu_temb, rope, attention_mask):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_modulation(silu_temb)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_modulation(silu_temb)

        img_attn, txt_attn = self.attention(
            modulate(self.img_norm1(img), i_shift1, i_scale1),
            modulate(self.txt_norm1(txt), t_shift1, t_scale1),
            rope, attention_mask,
        )
        img = gated_residual(img, i_gate1, img_attn)
        txt = gated_residual(txt, t_gate1, txt_attn)

        img_mlp = self._mlp(self.img_mlp, modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt_mlp = self._mlp(self.txt_mlp, modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return gated_residual(img, i_gate2, img_mlp), gated_residual(txt, t_gate2, txt_mlp)
