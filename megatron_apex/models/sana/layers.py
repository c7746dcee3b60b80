"""The Sana block (diffusers' ``SanaTransformerBlock``), built from megatron-core pieces
through a ModuleSpec.

Activations are batch-first, [batch, sequence, hidden] (megatron's linears take any leading
dims): the image tokens of a sample then form a channels-last image, so the GLUMBConv's
depthwise convolution reads them in place, without the transposing copies that dominated
the step in [s, b, h]. Tensor parallelism: the
self-attention's fused QKV, the cross-attention's q/k/v and the GLUMBConv's first 1x1 conv
are ``ColumnParallelLinear`` (whole heads / whole channel pairs per rank), their output
projections ``RowParallelLinear``; the depthwise 3x3 conv holds this rank's channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn

from megatron_apex.models.common.attention import attention, check_kernel
from megatron_apex.models.common.modulation import modulate
from megatron_apex.models.common.timestep import TimestepEmbedder, sinusoidal_timestep_features

# diffusers turns the 1/0 caption mask into this additive bias (not -inf: a fully padded
# caption then averages all tokens instead of giving NaN).
MASK_BIAS = -10000.0
# Sana's pipelines pass timestep = 1000 * sigma; our t is sigma.
TIMESTEP_SCALE = 1000.0


def zeros_init(weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.zeros_(weight)


def _tp_rank_and_size(tp_group):
    if tp_group is None:
        return 0, 1
    return torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


class SanaTimestepEmbedder(TimestepEmbedder):
    """diffusers' ``Timesteps(256, flip_sin_to_cos=True, scale=1)`` on ``1000 * t`` then the
    two-linear MLP. The 1000 multiplies t BEFORE the frequencies, as the pipeline does
    (Qwen-Image's embedder scales after, which differs in the last float bits)."""

    def __init__(self, hidden_size: int, num_channels: int = 256, dtype: torch.dtype = torch.float32):
        super().__init__(hidden_size, num_channels, scale=1.0, dtype=dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_features(t.float() * TIMESTEP_SCALE, self.num_channels, scale=1.0)
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class ScaleShiftTable(MegatronModule):
    """A learned (num_chunks, D) table added to per-sample conditioning (adaLN-single):
    ``chunks = weight[None] + cond.reshape(B, num_chunks, D)`` for ``cond`` (B, num_chunks * D),
    or ``weight[None] + cond`` for ``cond`` (B, 1, D) (one vector for every chunk: the final
    layer). Returned as num_chunks tensors shaped (B, 1, D) to broadcast over [b, s, h].
    Replicated over TP."""

    def __init__(self, config, num_chunks: int, hidden_size: int):
        super().__init__(config=config)
        self.num_chunks = num_chunks
        self.weight = nn.Parameter(torch.empty(num_chunks, hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            with torch.no_grad():  # diffusers' / PixArt's init
                self.weight.copy_(torch.randn(num_chunks, hidden_size) / hidden_size ** 0.5)

    def forward(self, cond: torch.Tensor) -> tuple:
        if cond.dim() == 2:
            cond = cond.reshape(cond.shape[0], self.num_chunks, -1)
        table = self.weight[None] + cond
        return tuple(table[:, j:j + 1] for j in range(self.num_chunks))


class ReLULinearAttention(MegatronModule):
    """Sana's linear attention (diffusers' ``SanaLinearAttnProcessor2_0``), per head, in float32:
    ``out = (sum_n v_n relu(k_n)^T) relu(q) / (relu(q) . sum_n relu(k_n) + 1e-15)``.
    Inputs [b, s, heads, head_dim]; output [b, s, heads * head_dim] in the input dtype.
    No parameters; heads are independent, so a TP rank just sees fewer of them."""

    def __init__(self, config, layer_number: int = 1, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number

    def forward(self, query, key, value, attention_mask=None, **unused):
        if attention_mask is not None:
            raise ValueError("Sana's linear self-attention takes no attention mask")
        b, s, heads, head_dim = query.shape
        dtype = query.dtype
        q = F.relu(query).permute(0, 2, 3, 1).float()  # (B, h, d, N)
        k = F.relu(key).permute(0, 2, 1, 3).float()  # (B, h, N, d)
        v = value.permute(0, 2, 3, 1).float()  # (B, h, d, N)
        # The appended row of ones makes the same matmuls produce the normaliser.
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(v, k), q)  # (B, h, d + 1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        return out.permute(0, 3, 1, 2).reshape(b, s, heads * head_dim).to(dtype)


class MaskedSDPAttention(MegatronModule):
    """Cross-attention core: softmax attention with diffusers' additive -10000 caption bias.
    Inputs [b, s, heads, head_dim]; ``attention_bias`` (B, 1, 1, L) or None. Runs on the
    kernel ``attention_backend`` (models/common/attention.py); on flash-attn the bias becomes
    the equivalent key-padding (exact, an all-padded caption included)."""

    def __init__(self, config, layer_number: int = 1, softmax_scale: Optional[float] = None,
                 attention_backend: str = "auto", **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.attention_backend = check_kernel(attention_backend)

    def forward(self, query, key, value, attention_bias=None, **unused):
        b, s, heads, head_dim = query.shape
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = attention(q, k, v, attn_mask=attention_bias, scale=self.softmax_scale, kernel=self.attention_backend)
        return out.transpose(1, 2).reshape(b, s, heads * head_dim)


@dataclass
class SanaSelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None


class SanaSelfAttention(MegatronModule):
    """Linear self-attention: fused per-head QKV (megatron's layout [q_h | k_h | v_h] per
    head, so a contiguous TP split keeps whole heads; bias per ``attention_bias``), the ReLU
    linear-attention core, output projection with bias."""

    def __init__(self, config, submodules: SanaSelfAttentionSubmodules, layer_number: int = 1,
                 attention_bias: bool = False, tp_group=None, **unused):
        super().__init__(config=config)
        hidden = config.hidden_size
        self.head_dim = config.kv_channels
        self.linear_qkv = build_module(
            submodules.linear_qkv, hidden, 3 * hidden, config=config, init_method=config.init_method,
            gather_output=False, bias=attention_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=tp_group,
        )
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number)
        self.linear_proj = build_module(
            submodules.linear_proj, hidden, hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="proj", tp_group=tp_group,
        )

    def forward(self, x):
        mixed, _ = self.linear_qkv(x)
        mixed = mixed.reshape(mixed.shape[0], mixed.shape[1], -1, 3 * self.head_dim)
        q, k, v = torch.split(mixed, self.head_dim, dim=-1)
        out, _ = self.linear_proj(self.core_attention(q, k, v))
        return out


@dataclass
class SanaCrossAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None  # built twice: linear_k and linear_v
    linear_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None


class SanaCrossAttention(MegatronModule):
    """Image queries, caption keys/values (separate column-parallel q, k, v, all with bias;
    a contiguous TP split of each keeps whole heads), softmax attention with the caption
    bias, output projection with bias. No norm, no gate (diffusers' ``attn2``). The output
    projection starts at zero (PixArt), so blocks start without text conditioning."""

    def __init__(self, config, submodules: SanaCrossAttentionSubmodules, layer_number: int = 1,
                 num_heads: int = 1, head_dim: int = 1, tp_group=None, **unused):
        super().__init__(config=config)
        hidden = config.hidden_size
        inner = num_heads * head_dim
        self.head_dim = head_dim

        def column(spec, name):
            return build_module(spec, hidden, inner, config=config, init_method=config.init_method,
                                gather_output=False, bias=True, skip_bias_add=False, is_expert=False,
                                tp_comm_buffer_name=name, tp_group=tp_group)

        self.linear_q = column(submodules.linear_q, "cross_q")
        self.linear_k = column(submodules.linear_kv, "cross_k")
        self.linear_v = column(submodules.linear_kv, "cross_v")
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number)
        self.linear_proj = build_module(
            submodules.linear_proj, inner, hidden, config=config, init_method=zeros_init, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="cross_proj",
            tp_group=tp_group,
        )

    def _heads(self, linear, x):
        out, _ = linear(x)
        return out.reshape(out.shape[0], out.shape[1], -1, self.head_dim)

    def forward(self, x, context, attention_bias):
        q = self._heads(self.linear_q, x)
        k = self._heads(self.linear_k, context)
        v = self._heads(self.linear_v, context)
        out, _ = self.linear_proj(self.core_attention(q, k, v, attention_bias=attention_bias))
        return out


class DepthwiseConv3x3(MegatronModule):
    """Depthwise 3x3 convolution (padding 1) over this TP rank's channels.

    The weight (C, 1, 3, 3) and bias (C,) are split along dim 0 over TP ranks, marked as
    tensor-parallel for megatron (optimizer, grad norm, checkpoints). Initialised from a
    full-size master on the CPU (PyTorch's conv default bound 1/3 for the weight, zero bias),
    so every TP size gets the same weights from the same seed."""

    def __init__(self, config, channels: int, tp_group=None):
        super().__init__(config=config)
        rank, size = _tp_rank_and_size(tp_group)
        if channels % size:
            raise ValueError(f"depthwise conv channels ({channels}) not divisible by TP size {size}")
        local = channels // size
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(local, 1, 3, 3, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.empty(local, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        if config.perform_initialization:
            with torch.no_grad():
                master = torch.empty(channels, 1, 3, 3, dtype=torch.float32, device=self.weight.device)
                nn.init.uniform_(master, -1.0 / 3.0, 1.0 / 3.0)
                self.weight.copy_(master.chunk(size, dim=0)[rank])
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=1, padding=1, groups=x.shape[1])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        axes = {"weight": 0, "bias": 0}
        if self.tp_group is None:  # built before megatron was set up: its groups now
            return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


@dataclass
class GLUMBConvSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    depthwise: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


class GLUMBConv(MegatronModule):
    """diffusers' ``GLUMBConv``: 1x1 conv D -> 2H, SiLU, depthwise 3x3, x * SiLU(gate), 1x1 conv H -> D.

    The 1x1 convs are linears over tokens. diffusers lays the 2H channels out as
    [x (H); gate (H)]; ours interleaves them, channel j of x then channel j of the gate, so a
    contiguous TP split of ``linear_fc1`` and of the depthwise conv gives every rank matching
    x and gate channels (the conversion table reorders). ``linear_fc2`` has no bias."""

    def __init__(self, config, submodules: GLUMBConvSubmodules, tp_group=None, **unused):
        super().__init__(config=config)
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1, hidden, 2 * ffn, config=config, init_method=config.init_method,
            gather_output=False, bias=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=tp_group,
        )
        self.depthwise = build_module(submodules.depthwise, config=config, channels=2 * ffn, tp_group=tp_group)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, hidden, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc2",
            tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b = x.shape[0]
        h, _ = self.linear_fc1(x)
        # [B, N, C] tokens are a channels-last (B, C, h, w) image: views, no copies.
        h = F.silu(h).reshape(b, height, width, -1).permute(0, 3, 1, 2)
        h = self.depthwise(h)
        h = h[:, 0::2] * F.silu(h[:, 1::2])
        out, _ = self.linear_fc2(h.permute(0, 2, 3, 1).reshape(b, height * width, -1))
        return out


@dataclass
class SanaLayerSubmodules:
    time_modulation_linear: Union[ModuleSpec, type] = None  # SanaModel's adaLN-single linear
    adaln_norm: Union[ModuleSpec, type] = None
    attention: Union[ModuleSpec, type] = None
    cross_attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class SanaLayer(MegatronModule):
    """One Sana block. adaLN-single: (shift, scale, gate) x (attention, MLP) =
    ``modulation.weight[None] + t6``; x += gate1 * LinearAttn(modulate(LN(x)));
    x += CrossAttn(x, caption); x += gate2 * GLUMBConv(modulate(LN(x)))."""

    def __init__(self, config, submodules: SanaLayerSubmodules, layer_number: int = 1, tp_group=None,
                 cp_group=None, num_cross_attention_heads: int = 1, cross_attention_head_dim: int = 1,
                 attention_bias: bool = False):
        super().__init__(config=config)
        self.layer_number = layer_number
        hidden = config.hidden_size
        self.modulation = ScaleShiftTable(config, 6, hidden)

        def norm():
            return build_module(submodules.adaln_norm, config=config, hidden_size=hidden,
                                eps=config.layernorm_epsilon)

        self.norm1, self.norm2 = norm(), norm()
        self.attention = build_module(submodules.attention, config=config, layer_number=layer_number,
                                      attention_bias=attention_bias, tp_group=tp_group)
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number,
                                            num_heads=num_cross_attention_heads,
                                            head_dim=cross_attention_head_dim, tp_group=tp_group)
        self.mlp = build_module(submodules.mlp, config=config, tp_group=tp_group)

    def forward(self, x, context, t6, attention_bias, height: int, width: int):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t6)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attention(x, context, attention_bias)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2), height, width)
        return x
