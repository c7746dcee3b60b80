"""Each CPU adaptation: the megatron-core path it exists for works with it and fails without it.

"Without it" is checked in-process with ``cpu_adaptation.suspended(name)`` (the adaptation is
reverted for the block), and once in a fresh process that never applied one of them.
"""

import os
import subprocess
import sys
import threading
from functools import partial

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU adaptations apply only without CUDA")

from megatron_apex.parallel import (  # noqa: E402
    adaptation_names,
    adaptation_reasons,
    applied_adaptations,
    apply_cpu_adaptations,
    init_distributed,
    set_seed,
)
from megatron_apex.parallel import cpu_adaptation  # noqa: E402
from megatron_apex.parallel.cpu_adaptation import suspended  # noqa: E402

CUDA_FAILURE = (RuntimeError, AssertionError)  # "Torch not compiled with CUDA" / "no accelerator"
CUDA_MESSAGE = "CUDA|accelerator"


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    init_distributed(1, 1)


def _config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _mlp(config, hidden=8, ffn=12):
    """Column -> Row parallel MLP as a MegatronModule (what DDP and the schedules expect)."""
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.core.transformer import MegatronModule

    class MLP(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            init = partial(torch.nn.init.normal_, std=0.5)
            self.fc1 = tensor_parallel.ColumnParallelLinear(hidden, ffn, config=config, init_method=init,
                                                            bias=True, gather_output=False)
            self.fc2 = tensor_parallel.RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=True,
                                                         input_is_parallel=True, skip_bias_add=False)

        def set_input_tensor(self, tensor):
            pass

        def forward(self, x):
            h, _ = self.fc1(x)
            y, _ = self.fc2(torch.nn.functional.gelu(h))
            return y

    return MLP()


def _dense_copy(mlp):
    """The same MLP as plain torch Linear layers (the reference)."""
    dense = torch.nn.Sequential(torch.nn.Linear(mlp.fc1.input_size, mlp.fc1.output_size), torch.nn.GELU(),
                                torch.nn.Linear(mlp.fc2.input_size, mlp.fc2.output_size))
    with torch.no_grad():
        for dst, src in ((dense[0], mlp.fc1), (dense[2], mlp.fc2)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return dense


# ---- registry --------------------------------------------------------------------------------


def test_registry_is_applied_once_and_documented():
    names = adaptation_names()
    assert apply_cpu_adaptations() == names == applied_adaptations()
    assert apply_cpu_adaptations() == names  # idempotent
    from torch.overrides import _get_current_function_mode_stack

    assert sum(m is cpu_adaptation._MODE for m in _get_current_function_mode_stack()) == 1
    reasons = adaptation_reasons()
    for name in names:
        assert reasons[name].strip() and "\n" not in reasons[name]
        assert f"``{name}``" in cpu_adaptation.__doc__, f"module docstring does not describe {name}"


def test_unknown_name_is_a_one_line_error(monkeypatch):
    with pytest.raises(ValueError, match="exclude: unknown CPU adaptation"):
        apply_cpu_adaptations(exclude=["no_such_thing"])
    monkeypatch.setenv(cpu_adaptation.EXCLUDE_ENV, "device_redirect,typo")
    with pytest.raises(ValueError, match=cpu_adaptation.EXCLUDE_ENV + r".*\['typo'\]"):
        apply_cpu_adaptations()


def test_a_new_thread_gets_the_redirection_after_applying():
    outcome = {}

    def worker():
        try:
            torch.zeros(1, device="cuda")
            outcome["before"] = "no error"
        except CUDA_FAILURE as e:
            outcome["before"] = type(e).__name__
        apply_cpu_adaptations()
        outcome["after"] = torch.zeros(1, device="cuda").device.type

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert outcome["before"] != "no error"  # torch-function modes are per thread
    assert outcome["after"] == "cpu"


def test_excluding_by_env_var_in_a_fresh_process():
    # Nothing applied before: megatron's RNG seeding must fail exactly as without this module.
    code = (
        "import torch\n"
        "from megatron_apex.parallel import apply_cpu_adaptations\n"
        "print(apply_cpu_adaptations())\n"
        "from megatron.core import tensor_parallel\n"
        "try:\n"
        "    tensor_parallel.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)\n"
        "except (AssertionError, RuntimeError) as e:\n"
        "    print('FAILED', e)\n"
        "else:\n"
        "    print('SEEDED')\n"
    )
    env = {**os.environ, cpu_adaptation.EXCLUDE_ENV: "cpu_rng"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    applied, verdict = out.stdout.strip().splitlines()[-2:]
    assert "cpu_rng" not in applied and "device_redirect" in applied
    assert verdict.startswith("FAILED") and "CUDA" in verdict


# ---- device_redirect: pipeline schedule buffers (torch.zeros(..., device="cuda")) -------------


def _no_pipelining_step(model, batches):
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    def forward_step(data_iterator, m):
        x = next(data_iterator)
        y = m(x)
        return y, lambda out: (out.square().mean(), {"loss": out.square().mean().detach()})

    return forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=iter(batches),
                                          model=[model], num_microbatches=len(batches), seq_length=0,
                                          micro_batch_size=batches[0].shape[0], forward_only=False)


def test_device_redirect_pipeline_schedule():
    set_seed(11)
    model = _mlp(_config())
    dense = _dense_copy(model)
    batches = [torch.randn(4, 8), torch.randn(4, 8)]
    with suspended("device_redirect"), pytest.raises(CUDA_FAILURE, match=CUDA_MESSAGE):
        _no_pipelining_step(model, batches)
    model.zero_grad()

    reports = _no_pipelining_step(model, batches)
    # Reference: the dense copy, loss averaged over micro-batches as the schedule does.
    ref_losses = [dense(x).square().mean() for x in batches]
    (sum(ref_losses) / len(batches)).backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in reports]), torch.stack(ref_losses).detach())
    torch.testing.assert_close(model.fc1.weight.grad, dense[0].weight.grad)
    torch.testing.assert_close(model.fc2.weight.grad, dense[2].weight.grad)


def test_device_redirect_maps_every_spelling_of_a_cuda_device():
    x = torch.ones(2)
    produced = [torch.zeros(2, device="cuda"), torch.empty(2, device="cuda:1"), torch.ones(2, device=0),
                torch.ones(2, device=torch.device("cuda", 0)), x.cuda(), x.to("cuda"), x.to(device="cuda:0"),
                x.new_zeros(3, device="cuda"), torch.empty(2, pin_memory=True), x.pin_memory()]
    assert {t.device.type for t in produced} == {"cpu"}
    with suspended("device_redirect"), pytest.raises(CUDA_FAILURE, match=CUDA_MESSAGE):
        x.to("cuda")


# ---- cuda_type_names: optimizer classification + clip_grads assert -------------------------------


def _optimizer_step(model, x, *, distributed, clip_grad, lr):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0,
                                                       clip_grad=clip_grad, use_distributed_optimizer=distributed),
                                       [ddp])
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).square().mean().backward()
    ddp.finish_grad_sync()
    return optimizer.step()


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_cuda_type_names_optimizer_with_grad_clipping(distributed):
    lr, clip = 0.05, 0.1
    x = torch.randn(4, 8)
    set_seed(5)
    with suspended("cuda_type_names"):
        # The distributed optimizer rejects the params at construction, the plain one trips
        # clip_grads' `.type() == 'torch.cuda.FloatTensor'` assert at step.
        with pytest.raises(TypeError if distributed else AssertionError) as failure:
            _optimizer_step(_mlp(_config()), x, distributed=distributed, clip_grad=clip, lr=lr)
        culprit = "distrib_optimizer.py" if distributed else "clip_grads.py"
        assert failure.traceback[-1].path.name == culprit

    set_seed(5)
    model = _mlp(_config())
    dense = _dense_copy(model)
    update_ok, grad_norm, _ = _optimizer_step(model, x, distributed=distributed, clip_grad=clip, lr=lr)

    dense(x).square().mean().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(dense.parameters(), clip)
    assert ref_norm > clip  # clipping really happened
    torch.optim.Adam(dense.parameters(), lr=lr).step()
    assert update_ok
    assert grad_norm == pytest.approx(ref_norm.item(), rel=1e-5)
    for ours, ref in ((model.fc1, dense[0]), (model.fc2, dense[2])):
        torch.testing.assert_close(ours.weight.detach(), ref.weight.detach())
        torch.testing.assert_close(ours.bias.detach(), ref.bias.detach())


def test_cuda_type_names_answers_and_converts():
    x = torch.ones(2)
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.double().type() == "torch.cuda.DoubleTensor"
    assert x.type("torch.cuda.HalfTensor").dtype == torch.float16
    with suspended("cuda_type_names"):
        assert x.type() == "torch.FloatTensor"


# ---- mode_in_backward + cpu_rng: activation recompute in backward ---------------------------------


def _block_loss_and_grads(recompute: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    config = _config(num_layers=2, hidden_size=16, num_attention_heads=2, hidden_dropout=0.2,
                     attention_dropout=0.2, **kw)
    set_seed(21)
    block = TransformerBlock(config, get_gpt_layer_local_spec())
    x = torch.randn(6, 2, 16, requires_grad=True)  # [seq, batch, hidden]
    set_seed(22)  # dropout masks
    out = block(x, attention_mask=None)  # causal mask built on "cuda" by megatron
    out.square().mean().backward()
    return out.detach(), x.grad, [p.grad for p in block.parameters()]


def test_mode_in_backward_activation_recompute():
    with suspended("mode_in_backward"), pytest.raises(CUDA_FAILURE, match=CUDA_MESSAGE):
        _block_loss_and_grads(recompute=True)
    out_ref, dx_ref, grads_ref = _block_loss_and_grads(recompute=False)
    out, dx, grads = _block_loss_and_grads(recompute=True)
    # Recompute replays the forward (same dropout masks via the restored RNG states).
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dx, dx_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


# ---- cuda_current_device: global memory buffer, RoPE, grad buffers, GPU-style init --------------


def _memory_buffer():
    from megatron.core import parallel_state as ps

    t = ps.get_global_memory_buffer().get_tensor((3, 5), torch.float32, "adaptation-test")
    assert t.shape == (3, 5) and t.device.type == "cpu"


def _rotary():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    dim, seq = 8, 5
    emb = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0)(seq)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    torch.testing.assert_close(emb.reshape(seq, dim), torch.cat([freqs, freqs], dim=-1))


def _gpu_style_init():
    from megatron.core import tensor_parallel

    layer = tensor_parallel.ColumnParallelLinear(8, 6, config=_config(use_cpu_initialization=False),
                                                 init_method=torch.nn.init.normal_, bias=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x)[0], x @ layer.weight.t() + layer.bias)


def _grad_buffers():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = _mlp(_config())
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    assert model.fc1.weight.main_grad.device.type == "cpu"
    del ddp


@pytest.mark.parametrize("path", [_memory_buffer, _rotary, _gpu_style_init, _grad_buffers],
                         ids=["global_memory_buffer", "rotary_embedding", "gpu_style_init", "ddp_grad_buffers"])
def test_cuda_current_device(path):
    from megatron.core import parallel_state as ps

    set_seed(3)
    ps.get_global_memory_buffer().buffer.clear()  # force an allocation
    with suspended("cuda_current_device"), pytest.raises(CUDA_FAILURE, match=CUDA_MESSAGE):
        path()
    path()


# ---- cuda_synchronize: dist_checkpointing save (filesystem_async preload) ------------------------


def test_cuda_synchronize_dist_checkpoint_round_trip(tmp_path):
    from megatron.core import dist_checkpointing

    set_seed(7)
    saved = _mlp(_config())
    for d in ("without", "ckpt"):
        (tmp_path / d).mkdir()
    with suspended("cuda_synchronize"), pytest.raises(CUDA_FAILURE, match=CUDA_MESSAGE):
        dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path / "without"))

    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path / "ckpt"))
    set_seed(8)
    loaded = _mlp(_config())
    assert not torch.equal(loaded.fc1.weight, saved.fc1.weight)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path / "ckpt"))
    loaded.load_state_dict(state)
    for name, p in saved.state_dict().items():
        if isinstance(p, torch.Tensor):
            torch.testing.assert_close(loaded.state_dict()[name], p, msg=name)
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), saved(x))


# ---- cpu_rng: model_parallel_cuda_manual_seed + tracker fork ------------------------------------


def test_cpu_rng_tracker_fork():
    from megatron.core import tensor_parallel

    with suspended("cpu_rng"), pytest.raises(CUDA_FAILURE, match=CUDA_MESSAGE):
        tensor_parallel.model_parallel_cuda_manual_seed(123)

    def draws():
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        a = torch.rand(4)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        with tracker.fork():
            f1 = torch.rand(3)
        b = torch.rand(4)
        with tracker.fork():
            f2 = torch.rand(3)
        return a, b, torch.cat([f1, f2])

    a, b, forked = draws()
    # The default stream is the CPU generator seeded with the data-parallel seed, untouched by forks.
    g = torch.Generator().manual_seed(123)
    torch.testing.assert_close(torch.cat([a, b]), torch.rand(8, generator=g))
    # The forked stream continues across forks and is reproducible, and differs from the default one.
    a2, b2, forked2 = draws()
    torch.testing.assert_close(forked, forked2)
    assert not torch.allclose(forked[:4], torch.cat([a, b])[:4])
    with tensor_parallel.get_cuda_rng_tracker().fork():
        continued = torch.rand(2)
    assert not torch.allclose(continued, forked2[:2])


# ---- unintercepted_model_math: the forward runs without the mode, with the same numbers -----------


@pytest.mark.parametrize("name", ["qwen-image-tiny-test", "sana-tiny-test"])
def test_unintercepted_model_math_pops_the_mode_and_changes_no_number(name):
    from torch.overrides import _get_current_function_mode_stack

    from megatron_apex.families import build_model, get_model_config

    config = get_model_config(name)
    set_seed(0)
    model = build_model(config)
    seen = []
    first_layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
    first_layer.register_forward_pre_hook(
        lambda *_: seen.append(any(m is cpu_adaptation._MODE for m in _get_current_function_mode_stack())))
    gen = torch.Generator().manual_seed(0)
    side = 4 * config.patch_size
    x = torch.randn(2, config.latent_channels, side, side, generator=gen)
    t = torch.rand(2, generator=gen)
    ctx = torch.randn(2, 5, getattr(config, "joint_attention_dim", None) or config.caption_channels, generator=gen)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])

    def out_and_grads():
        model.zero_grad()
        out = model(x, t, ctx, mask)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out, grads = out_and_grads()
    with suspended("unintercepted_model_math"):
        out_ref, grads_ref = out_and_grads()
    assert seen == [False, True]
    assert torch.equal(out, out_ref) and len(grads) == len(grads_ref) > 0
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
