"""LoRA adapters (single process): the adapted linears against the hand-written formula
``W x + b + scale * B A x``, the frozen base, the on/off switch, merging, small checkpoints
tied to their base, target selection errors and the parameter / memory summary.

References: formulas on the modules' own tensors, the same model before adapting (B = 0),
a plain base model loaded with merged weights, counts summed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from family_cases import model_inputs
from megatron_apex.conversion.random_weights import randomize_weights_
from megatron_apex.lora import (
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    base_fingerprint,
    check_base_fingerprint,
    format_parameter_summary,
    load_lora_checkpoint,
    load_trainable_state_dict,
    lora_modules,
    merge_lora_,
    merged_state_dict,
    parameter_summary,
    save_lora_checkpoint,
    trainable_state_dict,
)
from megatron_apex.families import build_model, get_model_config


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def tiny_qwen(seed=0, **overrides):
    config = get_model_config("qwen-image-tiny-test", **overrides)
    torch.manual_seed(seed)
    model = build_model(config, backend="local").eval()
    return randomize_weights_(model, seed + 1)  # adaLN-Zero would make every block the identity


def qwen_inputs(config, B=2, **kwargs):
    return model_inputs(config, config.joint_attention_dim, B=B, **kwargs)


@torch.no_grad()
def randomize_adapters_(model, seed=0, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)
        m.lora_A.add_(torch.randn(m.lora_A.shape, generator=gen) * 0.1)


class Linears(nn.Module):
    """One of each linear LoRA adapts, side by side."""

    def __init__(self, d_in=6, d_out=10):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer import TransformerConfig

        cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
        init = nn.init.normal_
        self.col = ColumnParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=True, gather_output=False)
        self.col_gather = ColumnParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=True, gather_output=True)
        self.row = RowParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)
        self.row_skip = RowParallelLinear(d_in, d_out, config=cfg, init_method=init, bias=True,
                                          input_is_parallel=True, skip_bias_add=True)
        self.plain = nn.Linear(d_in, d_out)
        with torch.no_grad():
            for m in (self.col, self.col_gather, self.row, self.row_skip):
                m.bias.normal_()


@pytest.mark.parametrize("alpha", [None, 12.0])
def test_adapted_linears_match_the_formula(alpha):
    net = Linears()
    cfg = LoRAConfig(rank=3, alpha=alpha, targets=("col*", "row*", "plain"))
    assert sorted(apply_lora(net, cfg)) == ["col", "col_gather", "plain", "row", "row_skip"]
    randomize_adapters_(net)
    scale = (alpha or 3) / 3
    x = torch.randn(4, 2, 6)  # [s, b, in]
    for name in ("col", "col_gather", "row", "row_skip", "plain"):
        m = getattr(net, name)
        expected = x @ m.weight.T + scale * (x @ m.lora_A.T @ m.lora_B.T)
        result = m(x)
        if name == "plain":
            out, bias = result, None
            expected = expected + m.bias
        else:
            out, bias = result
            if name == "row_skip":  # the bias comes back separately, untouched
                assert torch.equal(bias, m.bias)
            else:
                assert bias is None
                expected = expected + m.bias
        assert (out - expected).abs().max().item() <= 1e-5, name
        assert (scale * (x @ m.lora_A.T @ m.lora_B.T)).abs().max() > 0.1  # the adapter term is not negligible


def test_dropout_acts_on_the_adapter_input_only():
    net = Linears()
    apply_lora(net, LoRAConfig(rank=2, targets="col", dropout=0.5))
    randomize_adapters_(net)
    m = net.col.train()
    x = torch.randn(5, 3, 6)
    torch.manual_seed(7)
    out, _ = m(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, True)
    expected = x @ m.weight.T + m.bias + dropped @ m.lora_A.T @ m.lora_B.T
    assert (out - expected).abs().max().item() <= 1e-5
    m.eval()
    out, _ = m(x)
    assert (out - (x @ m.weight.T + m.bias + x @ m.lora_A.T @ m.lora_B.T)).abs().max().item() <= 1e-5


def test_initialisation_is_peft_like_and_reproducible():
    model = tiny_qwen()
    apply_lora(model, LoRAConfig(rank=4, targets="all", init_seed=3))
    again = tiny_qwen()
    apply_lora(again, LoRAConfig(rank=4, targets="all", init_seed=3))
    other = tiny_qwen()
    apply_lora(other, LoRAConfig(rank=4, targets="all", init_seed=4))
    for name, m in lora_modules(model).items():
        assert torch.count_nonzero(m.lora_B) == 0
        bound = 1 / math.sqrt(m.lora_A.shape[1])  # kaiming-uniform, a = sqrt(5)
        assert m.lora_A.abs().max() <= bound
        assert m.lora_A.abs().max() > 0.7 * bound  # spread over the interval, not a narrow init
        assert torch.equal(m.lora_A, lora_modules(again)[name].lora_A)
        assert not torch.equal(m.lora_A, lora_modules(other)[name].lora_A)
    As = [m.lora_A for m in lora_modules(model).values()]
    assert not torch.equal(As[0][:, :8], As[1][:, :8])  # each module draws its own


def test_zero_B_leaves_the_model_exactly_unchanged():
    model = tiny_qwen(shift_kind="full")
    x, t, ctx, mask = qwen_inputs(model.model_config)
    with torch.no_grad():
        before = model(x, t, ctx, mask)
        before_fake = model(x, t, ctx, mask, fake_condition=True)
    apply_lora(model, LoRAConfig(rank=4, targets="all,img_in,txt_in,proj_out"))
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, mask), before)
        assert torch.equal(model(x, t, ctx, mask, fake_condition=True), before_fake)
    assert before.abs().max() > 0.1


def test_only_adapters_and_extras_train():
    model = tiny_qwen(shift_kind="full")
    names = apply_lora(model, LoRAConfig(rank=4, targets="attn+mlp"))
    assert len(names) == 2 * 8  # per layer: 4 attention + 4 MLP linears
    randomize_adapters_(model)
    expected_trainable = {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    expected_trainable |= {"condition_shift.A", "condition_shift.b"}
    expected_trainable |= {n for n, _ in model.named_parameters() if n.startswith("target_time_embedder.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable

    x, t, ctx, mask = qwen_inputs(model.model_config)
    out = model(x, t, ctx, mask, fake_condition=torch.tensor([True, False]), t_target=torch.zeros(2))
    (out ** 2).sum().backward()
    for name, p in model.named_parameters():
        if name not in expected_trainable:
            assert p.grad is None, name
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    # the last block's text-stream output is discarded: its tail gets no gradient
    assert got_grad == expected_trainable - {n for n in expected_trainable
                                             if n.startswith(("layers.1.attention.linear_added_proj",
                                                              "layers.1.txt_mlp"))}

    frozen_extras = tiny_qwen(shift_kind="full")
    apply_lora(frozen_extras, LoRAConfig(rank=4, targets="attn", train_condition_shift=False,
                                         train_target_time_embedder=False, extra_trainable=("img_in.*",)))
    assert {n for n, p in frozen_extras.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"img_in.weight", "img_in.bias"}


def test_adapters_disabled_gives_the_base_and_switches_back():
    base = tiny_qwen()
    model = tiny_qwen()
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    randomize_adapters_(model)
    x, t, ctx, mask = qwen_inputs(model.model_config)
    with torch.no_grad():
        ref = base(x, t, ctx, mask)
        adapted = model(x, t, ctx, mask)
        with adapters_disabled(model):
            assert torch.equal(model(x, t, ctx, mask), ref)
        assert torch.equal(model(x, t, ctx, mask), adapted)
    assert (adapted - ref).abs().max() > 0.1
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(base):
            pass


def test_merging_equals_the_adapted_model():
    model = tiny_qwen()
    apply_lora(model, LoRAConfig(rank=4, alpha=2.0, targets="all,img_in,proj_out"))
    randomize_adapters_(model)
    x, t, ctx, mask = qwen_inputs(model.model_config)
    with torch.no_grad():
        adapted = model(x, t, ctx, mask)
    merged = merged_state_dict(model)
    plain = build_model(model.model_config, backend="local").eval()
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert (plain(x, t, ctx, mask) - adapted).abs().max().item() <= 1e-5
    merge_lora_(model)
    assert not lora_modules(model) and not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert (model(x, t, ctx, mask) - adapted).abs().max().item() <= 1e-5


def test_trainable_state_dict_is_small_and_round_trips(tmp_path):
    config = get_model_config("qwen-image-tiny")
    torch.manual_seed(0)
    model = randomize_weights_(build_model(config, backend="local").eval(), 1)
    cfg = LoRAConfig(rank=4)
    apply_lora(model, cfg)
    randomize_adapters_(model)
    small = trainable_state_dict(model)
    full = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("_extra_state"))
    assert sum(v.numel() for v in small.values()) < 0.05 * full

    path = str(tmp_path / "lora.safetensors")
    save_lora_checkpoint(model, path, cfg, extra={"iteration": 7})
    twin = randomize_weights_(build_model(config, backend="local").eval(), 1)  # same base weights
    apply_lora(twin, cfg)
    x, t, ctx, mask = qwen_inputs(config, H=8, W=8)
    with torch.no_grad():
        expected = model(x, t, ctx, mask)
        assert (twin(x, t, ctx, mask) - expected).abs().max() > 1e-3  # adapters not loaded yet
        meta = load_lora_checkpoint(twin, path)
        assert torch.equal(twin(x, t, ctx, mask), expected)
    assert meta["extra"] == {"iteration": 7} and LoRAConfig.from_dict(meta["lora_config"]) == cfg


def test_checkpoint_refuses_a_different_base(tmp_path):
    model = tiny_qwen()
    cfg = LoRAConfig(rank=4)
    apply_lora(model, cfg)
    path = str(tmp_path / "lora.safetensors")
    save_lora_checkpoint(model, path, cfg)

    other = tiny_qwen()
    with torch.no_grad():
        other.layers[1].img_mlp.linear_fc2.weight[0, 0] += 0.05
    apply_lora(other, cfg)
    with pytest.raises(ValueError, match=r"different base model: layers\.1\.img_mlp\.linear_fc2\.weight differs"):
        load_lora_checkpoint(other, path)
    load_lora_checkpoint(other, path, check_base=False)  # the user may insist

    fp = base_fingerprint(model)
    check_base_fingerprint(fp, base_fingerprint(model))
    wider = tiny_qwen(num_attention_heads=4)
    apply_lora(wider, cfg)
    with pytest.raises(ValueError, match=r"different base model: final_modulation.linear.bias is float32 \[64\] "
                                         r"there, float32 \[128\] here"):
        check_base_fingerprint(fp, base_fingerprint(wider))

    other_targets = tiny_qwen()
    apply_lora(other_targets, LoRAConfig(rank=4, targets="mlp"))
    with pytest.raises(ValueError, match="adapts other modules than the model"):
        load_lora_checkpoint(other_targets, path)
    other_rank = tiny_qwen()
    apply_lora(other_rank, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="has LoRA rank 4 / alpha 4, the model's adapter rank 2 / alpha 2"):
        load_lora_checkpoint(other_rank, path)


def test_load_trainable_state_dict_errors():
    model = tiny_qwen()
    apply_lora(model, LoRAConfig(rank=4))
    state = trainable_state_dict(model)
    key = "layers.0.attention.linear_qkv.lora_A"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=rf"missing {key}"):
        load_trainable_state_dict(model, missing)
    assert load_trainable_state_dict(model, missing, strict=False) == ([key], [])
    with pytest.raises(ValueError, match=r"unexpected img_in.weight \(frozen in this model"):
        load_trainable_state_dict(model, {**state, "img_in.weight": model.img_in.weight})
    wrong = dict(state)
    wrong[key] = torch.zeros(8, state[key].shape[1])
    with pytest.raises(ValueError, match=rf"{key} has shape \[8, 32\], the model's is \[4, 32\] \(LoRA rank: 8"):
        load_trainable_state_dict(model, wrong)


def test_target_selection_errors():
    model = tiny_qwen()
    with pytest.raises(ValueError, match=r"pattern 'layers\.\*\.attn\.to_q' matches no module .*adaptable modules: "
                                         r"img_in, txt_in"):
        apply_lora(model, LoRAConfig(targets="layers.*.attn.to_q"))
    with pytest.raises(ValueError, match=r"'txt_norm' matches only modules LoRA cannot adapt: txt_norm \(RMSNorm\)"):
        apply_lora(model, LoRAConfig(targets="txt_norm"))
    with pytest.raises(ValueError, match="--lora-rank must be a positive integer"):
        apply_lora(model, LoRAConfig(rank=0))
    with pytest.raises(ValueError, match="--lora-extra-trainable 'nothing.*' matches no parameter"):
        apply_lora(model, LoRAConfig(extra_trainable=("nothing.*",)))
    apply_lora(tiny_qwen(), LoRAConfig(targets="attn"))
    adapted = tiny_qwen()
    apply_lora(adapted, LoRAConfig(targets="attn"))
    with pytest.raises(ValueError, match="already have a LoRA adapter: layers.0.attention.linear_qkv"):
        apply_lora(adapted, LoRAConfig(targets="all"))


def test_pipeline_stage_uses_global_names_and_the_same_initialisation():
    from megatron_apex.models.qwen_image.model import QwenImageModel
    from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec

    config = get_model_config("qwen-image-tiny-test")
    full = build_model(config, backend="local")
    stage = QwenImageModel(config, spec=get_qwen_image_layer_spec("local"), pre_process=False, layer_range=(1, 2))
    cfg = LoRAConfig(rank=4, targets="attn,mlp")
    full_names = apply_lora(full, cfg)
    stage_names = apply_lora(stage, cfg)
    assert stage_names == [n for n in full_names if n.startswith("layers.1.")]
    for name, m in lora_modules(stage).items():
        assert torch.equal(m.lora_A, lora_modules(full)[name].lora_A)
    assert set(trainable_state_dict(stage)) <= set(trainable_state_dict(full))


def test_parameter_summary_matches_a_hand_count():
    for dtype in ("float32", "bfloat16"):
        model = build_model(get_model_config("qwen-image-tiny-test", params_dtype=dtype), backend="local")
        apply_lora(model, LoRAConfig(rank=4, targets="all"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapters = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
        s = parameter_summary(model, dp_size=4, distributed_optimizer=True)
        assert s["trainable"] == trainable and s["adapter"] == adapters
        assert s["total"] == sum(p.numel() for p in model.parameters())
        assert s["adam_state_bytes"] == math.ceil(8 * trainable / 4)
        assert s["master_param_bytes"] == (0 if dtype == "float32" else math.ceil(4 * trainable / 4))
        assert s["grad_bytes"] == 4 * trainable
        assert f"{trainable:,} trainable" in format_parameter_summary(s)
