"""Qwen-Image's joint attention under a kernel that reads the padding mask as per-sample
lengths, as Transformer Engine's cuDNN fused attention does: its ``get_cu_seqlens`` counts
each sample's unmasked tokens n and the kernel attends over the FIRST n tokens (queries and
keys), padded query rows coming out as zeros. The joint sequence [image, text] keeps the text
padding trailing, so such a kernel computes exactly the masked attention; the former order
[text, image] would mask the last image tokens instead. The reference is SDPA with the explicit
boolean mask, which honours every position."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_apex.conversion.random_weights import randomize_weights_
from megatron_apex.families import build_model, get_model_config
from megatron_apex.models.qwen_image import layers as qwen_layers
from megatron_apex.models.qwen_image import model as qwen_model
from megatron_apex.models.qwen_image.model import QwenImageModel
from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec

# valid text tokens per sample: full, partial, a single one, none (an all-padded prompt)
TEXT_LEN = 6
VALID = (6, 4, 1, 0)


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def lengths_attention(q, k, v, masked):
    """q, k, v [b, h, s, d]; masked [b, 1, 1, s] bool, True = masked out. Only the NUMBER of
    unmasked tokens per sample is read (TE's get_cu_seqlens: ``mask.logical_not().sum``)."""
    b, h, s, d = q.shape
    counts = (~masked).reshape(b, s).sum(dim=1)
    out = torch.zeros_like(q)
    for i, n in enumerate(counts.tolist()):
        scores = q[i, :, :n] @ k[i, :, :n].transpose(-1, -2) / math.sqrt(d)
        out[i, :, :n] = scores.softmax(dim=-1) @ v[i, :, :n]
    return out


def masked_reference(q, k, v, masked):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)


def text_mask(valid=VALID, length=TEXT_LEN):
    """Right-padded (B, L) bool, as the loaders and text encoders produce."""
    return torch.arange(length)[None, :] < torch.tensor(valid)[:, None]


def old_join(image, text, dim=0):
    """The former joint order: text, then image."""
    return torch.cat([text, image], dim=dim)


def old_split(joint, num_image, dim=0):
    text_len = joint.shape[dim] - num_image
    return joint.narrow(dim, text_len, num_image), joint.narrow(dim, 0, text_len)


def test_lengths_attention_equals_masked_attention_in_the_joint_order():
    gen = torch.Generator().manual_seed(0)
    b, heads, n_img, d = len(VALID), 2, 5, 8

    def stream(n):
        return [torch.randn(b, heads, n, d, generator=gen) for _ in range(3)]

    (iq, ik, iv), (tq, tk, tv) = stream(n_img), stream(TEXT_LEN)
    keep_text = text_mask()

    masked = QwenImageModel._attention_mask(keep_text, n_img)
    q, k, v = (qwen_layers.join_streams(i, t, dim=2) for i, t in ((iq, tq), (ik, tk), (iv, tv)))
    ref = masked_reference(q, k, v, masked)
    out = lengths_attention(q, k, v, masked)
    for i, n_text in enumerate(VALID):
        valid = n_img + n_text  # the valid tokens are the first ones: image, then valid text
        torch.testing.assert_close(out[i, :, :valid], ref[i, :, :valid], rtol=0, atol=1e-5)
    ref_img, _ = qwen_layers.split_streams(ref, n_img, dim=2)
    hand_img = masked_reference(iq, ik, iv, torch.zeros(b, 1, 1, n_img, dtype=torch.bool))
    # an independent check of the reference: the all-padded prompt's image attends to the image alone
    torch.testing.assert_close(ref_img[-1], hand_img[-1], rtol=0, atol=1e-5)

    # The former order [text, image] with its mask: the count now covers the first text and
    # image tokens, so a padded prompt masks its LAST image tokens instead of its padding.
    old_masked = ~torch.cat([keep_text, torch.ones(b, n_img, dtype=torch.bool)], dim=1)[:, None, None, :]
    q, k, v = (old_join(i, t, dim=2) for i, t in ((iq, tq), (ik, tk), (iv, tv)))
    old_ref_img, _ = old_split(masked_reference(q, k, v, old_masked), n_img, dim=2)
    old_img, _ = old_split(lengths_attention(q, k, v, old_masked), n_img, dim=2)
    torch.testing.assert_close(old_ref_img, ref_img, rtol=0, atol=1e-5)  # the reference ignores order
    torch.testing.assert_close(old_img[0], old_ref_img[0], rtol=0, atol=1e-5)  # no padding: no harm
    for i in range(1, b):
        assert (old_img[i] - old_ref_img[i]).abs().max() > 0.1, i


class LengthsCoreAttention(MegatronModule):
    """Core attention with SDPAttention's signature ([s, b, heads, head_dim] in, [s, b, hidden]
    out) computing :func:`lengths_attention`: TE's cuDNN kernel, emulated."""

    def __init__(self, config, layer_number: int = 1, **unused):
        super().__init__(config=config)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **unused):
        s, b, heads, head_dim = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is None:
            attention_mask = torch.zeros(b, 1, 1, s, dtype=torch.bool, device=query.device)
        out = lengths_attention(q, k, v, attention_mask)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)


def lengths_spec():
    spec = copy.deepcopy(get_qwen_image_layer_spec("local"))
    spec.submodules.attention.submodules.core_attention = LengthsCoreAttention
    return spec


def tiny_models():
    config = get_model_config("qwen-image-tiny-test")
    reference = randomize_weights_(build_model(config, backend="local"), seed=3).eval()
    lengths = build_model(get_model_config("qwen-image-tiny-test"), spec=lengths_spec()).eval()
    lengths.load_state_dict(reference.state_dict())
    assert not reference.padding_read_as_lengths and lengths.padding_read_as_lengths
    return config, reference, lengths


def model_inputs(config):
    gen = torch.Generator().manual_seed(4)
    b = len(VALID)
    x = torch.randn(b, config.out_channels, 6, 8, generator=gen)
    t = torch.rand(b, generator=gen)
    ctx = torch.randn(b, TEXT_LEN, config.joint_attention_dim, generator=gen)
    return x, t, ctx, text_mask()


def output_and_grads(model, x, t, ctx, mask):
    model.zero_grad(set_to_none=True)
    out = model(x, t, ctx, mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_under_lengths_attention_equals_masked_model():
    """Whole model, forward and every gradient: the lengths kernel equals the masked one."""
    config, reference, lengths = tiny_models()
    args = model_inputs(config)
    ref, ref_grads = output_and_grads(reference, *args)
    out, grads = output_and_grads(lengths, *args)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_model_in_the_former_order_breaks_under_lengths_attention(monkeypatch):
    """The same comparison with the joint order switched back to [text, image] (attention and
    mask alike): the masked model does not notice, the lengths kernel does."""
    config, reference, lengths = tiny_models()
    args = model_inputs(config)
    with torch.no_grad():
        ref = reference(*args)
        monkeypatch.setattr(qwen_layers, "join_streams", old_join)
        monkeypatch.setattr(qwen_layers, "split_streams", old_split)
        monkeypatch.setattr(qwen_model, "join_streams", old_join)
        torch.testing.assert_close(reference(*args), ref, rtol=0, atol=1e-5)
        old = lengths(*args)
    torch.testing.assert_close(old[0], ref[0], rtol=0, atol=1e-5)  # the unpadded prompt
    assert (old[1:] - ref[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_text_padding_before_a_valid_token_is_refused_under_lengths_attention():
    config, reference, lengths = tiny_models()
    x, t, ctx, mask = model_inputs(config)
    holes = mask.clone()
    holes[1, 0] = False  # a padded token before valid ones
    with torch.no_grad():
        reference(x, t, ctx, holes)  # masked by position: any pattern is fine
        lengths(x, t, ctx, mask)
        with pytest.raises(ValueError, match="right-padded"):
            lengths(x, t, ctx, holes)
