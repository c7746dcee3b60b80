"""Per-GPU memory of a training step, counted on the model itself built on the meta device.

Each pipeline stage is built at its real tensor-/pipeline-parallel position inside a *fake*
process group (torch's "fake" backend: every collective is a no-op and nothing is allocated),
so the weight, gradient and optimizer figures are exact byte counts of the objects the
training loop builds: megatron's DDP grad buffer (fp32 main grads), Adam's two fp32 moments
and, for 16-bit parameters, the fp32 master copy, both divided over data-parallel ranks by the
distributed optimizer; plus the frozen teacher and the EMA copy when the run keeps them.

Activations are what autograd saves for the backward: the real objective (``apex_loss`` /
``fm_loss``) is traced on meta tensors with saved-tensor hooks, attention counted as a flash
kernel saves it (q, k, v, output, log-sum-exp; the meta device would otherwise pick the math
path and its S x S probabilities). A stage holds the activations of as many micro-batches as
1F1B keeps in flight there (min(PP - stage, micro-batches)), plus, with full activation
recompute, the activations of the one layer being recomputed. On the CPU this matches the allocator's
measured peak of a real training step within a few percent (tests/unit/test_memory_estimate.py).

Fully sharded data parallelism (``fsdp``, the trainer's --fsdp at TP = PP = 1): weights, their
gradients (in the parameters' dtype), Adam state and the teacher / EMA copies are this rank's
row shards (data-parallel rank 0 holds the largest); on top, ``gathered`` counts the unsharded
working set: the root module's own parameters, two layers' (the one computing, the one
prefetched) and one layer's gradients as autograd makes them plus their fp32 reduce-scatter
input. The optimizer step adds fp32 copies of the gradient shards under 16-bit parameters,
while no activations are held; not counted. Activations do not change.

Sequence parallelism (``sequence_parallel``, TP > 1) is traced as it runs: the model is built
with it, so each rank's saved activations between the tensor-parallel linears are its 1/TP of
the tokens. Not counted: megatron's one reused all-gather buffer (one layer input's worth).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_apex.families import build_model, get_model_config
from megatron_apex.lora import LoRAConfig, apply_lora
from megatron_apex.models.common.sequence_parallel import check_sequence_parallel
from megatron_apex.objectives.apex import APEXConfig, apex_loss
from megatron_apex.objectives.fm import fm_loss
from megatron_apex.parallel.cpu_adaptation import apply_cpu_adaptations
from megatron_apex.parallel.recompute import enable_activation_recompute

GIB = 1024 ** 3


@dataclass
class MemoryPlanConfig:
    model: str
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    latent_grid: Tuple[int, int] = (64, 64)  # patch tokens per side (e.g. 1024 px / VAE 8 / patch 2)
    text_len: int = 256
    objective: str = "apex"  # apex | fm
    apex_variant: str = "released"
    teacher: str = "frozen"  # frozen | online (released variant)
    ema: bool = False
    lora_rank: int = 0
    lora_targets: str = "attn"
    recompute: Optional[str] = None  # None | selective | full
    sequence_parallel: bool = False  # Megatron-LM's --sequence-parallel (TP > 1; --search: its TP > 1 layouts)
    distributed_optimizer: bool = True
    fsdp: bool = False  # the trainer's --fsdp (TP = PP = 1; --search: the TP = PP = 1 layout with and without)
    params_dtype: str = "bfloat16"
    model_overrides: Dict = field(default_factory=dict)

    def validate(self) -> "MemoryPlanConfig":
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size",
                     "micro_batch_size", "num_microbatches", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.objective not in ("apex", "fm"):
            raise ValueError(f"--objective {self.objective!r}: choose apex or fm")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"--recompute {self.recompute!r}: choose none, selective or full")
        if self.params_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--params-dtype {self.params_dtype!r}: choose bfloat16 or float32")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.fsdp:
            for flag, value in (("--tensor-model-parallel-size", self.tensor_model_parallel_size),
                                ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
                                ("--lora-rank", self.lora_rank)):
                if value not in (0, 1):
                    raise ValueError(f"--fsdp cannot run with {flag} {value} (FSDP: full-parameter, TP = PP = 1)")
        if self.sequence_parallel:
            check_sequence_parallel(_model_config(self), self.tensor_model_parallel_size, lora=self.lora_rank > 0)
        return self


@dataclass
class StageMemory:
    stage: int
    layers: int
    parameters: int  # on this GPU
    trainable: int
    weights: int  # bytes
    grads: int
    optimizer: int
    copies: int  # frozen teacher + EMA
    activations: int
    gathered: int = 0  # --fsdp: the unsharded layers and gradients in flight

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.copies + self.activations + self.gathered


# ------------------------------------------------------------------------------ fake world
class _AllOnMeta(torch.overrides.TorchFunctionMode):
    """Buffers megatron allocates on "the current device" (all-gather outputs, RNG states,
    grad buffers) are made on the meta device too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs = {**kwargs, "device": torch.device("meta")}
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_parallel_world(tp: int, pp: int, dp: int, stage: int = 0):
    """megatron's parallel_state for the rank (tp 0, dp 0, pipeline ``stage``) of a
    tp x pp x dp job, in this one process, without communication or allocation."""
    if dist.is_initialized():
        raise RuntimeError("the memory estimate builds its own (fake) process group: run it in a process "
                           "without torch.distributed initialised (tools/estimate_memory.py)")
    if not torch.cuda.is_available():
        apply_cpu_adaptations()
    world = tp * pp * dp
    # megatron's default rank order tp-cp-ep-dp-pp: the pipeline rank is the slowest index
    dist.init_process_group("fake", store=FakeStore(), rank=stage * tp * dp, world_size=world)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        if ps.get_pipeline_model_parallel_rank() != stage or ps.get_tensor_model_parallel_rank() != 0:
            raise RuntimeError("unexpected megatron rank order in the fake world")
        model_parallel_cuda_manual_seed(0)
        with _AllOnMeta():
            yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ counting
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model_config(plan: MemoryPlanConfig, **extra):
    return get_model_config(plan.model, params_dtype=plan.params_dtype, **{**plan.model_overrides, **extra})


def _apply_lora(model, plan: MemoryPlanConfig) -> None:
    if plan.lora_rank:
        apply_lora(model, LoRAConfig(rank=plan.lora_rank, targets=plan.lora_targets))


def _build_stage(plan: MemoryPlanConfig, config):
    with torch.device("meta"):
        model = build_model(config, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), backend="local",
                            sequence_parallel=plan.sequence_parallel)
        _apply_lora(model, plan)
    return model


def state_bytes(params: List[torch.nn.Parameter], plan: MemoryPlanConfig) -> Dict[str, int]:
    """Weights, fp32 main grads and Adam state (+ fp32 master weights for 16-bit params) of
    one rank, as megatron's DDP and optimizer allocate them."""
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    master = sum(p.numel() * 4 for p in trainable if p.dtype != torch.float32)
    dp = plan.data_parallel_size if plan.distributed_optimizer else 1
    # the distributed optimizer pads each bucket to a multiple of the DP size; the padding is
    # < dp elements per bucket, nothing at these sizes
    return {"weights": _bytes(params), "grads": 4 * n_train, "optimizer": (8 * n_train + master) // dp,
            "parameters": sum(p.numel() for p in params), "trainable": n_train}


def _fsdp_shard(p: torch.Tensor, dp: int) -> int:
    """Elements of data-parallel rank 0's FSDP shard of ``p``: torch.chunk of dim 0, whose first
    chunks hold ceil(rows / dp) rows."""
    if p.dim() == 0 or p.shape[0] == 0:
        return p.numel()
    return -(-p.shape[0] // dp) * (p.numel() // p.shape[0])


def fsdp_state_bytes(model: torch.nn.Module, plan: MemoryPlanConfig) -> Dict[str, int]:
    """--fsdp: rank 0's shards of the weights, gradients (the parameters' dtype) and Adam state
    (+ fp32 master shards for 16-bit parameters), and the unsharded working set (module
    docstring)."""
    dp = plan.data_parallel_size
    params = list(model.parameters())
    shard = {id(p): _fsdp_shard(p, dp) for p in params}
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(shard[id(p)] for p in trainable)
    master = sum(shard[id(p)] * 4 for p in trainable if p.dtype != torch.float32)
    units = [list(layer.parameters()) for layer in getattr(model, "layers", [])]
    in_layers = {id(p) for unit in units for p in unit}
    root = [p for p in params if id(p) not in in_layers]
    largest_layer = max((_bytes(unit) for unit in units), default=0)
    # one unit's gradients in flight: the parameters' dtype from autograd + the fp32 reduce-scatter input
    grads_in_flight = max(_bytes(unit) + 4 * sum(p.numel() for p in unit) for unit in [*units, root])
    return {"weights": sum(shard[id(p)] * p.element_size() for p in params),
            "grads": sum(shard[id(p)] * p.element_size() for p in trainable), "optimizer": 8 * n_train + master,
            "parameters": sum(shard.values()), "trainable": n_train,
            "gathered": _bytes(root) + 2 * largest_layer + grads_in_flight}


# ------------------------------------------------------------------------------ activations
class _FlashAttentionSaves(torch.autograd.Function):
    """Stands in for SDPA on meta tensors: saves what a flash kernel saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _flash_attention_on_meta():
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type != "meta":
            return original(q, k, v, *args, **kwargs)
        return _FlashAttentionSaves.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(model, plan: MemoryPlanConfig, config, teacher=None) -> int:
    """Bytes autograd keeps for the backward of one micro-batch of the objective (meta trace)."""
    b = plan.micro_batch_size
    p = config.patch_size
    meta = dict(device="meta", dtype=torch.float32)
    x0 = torch.empty(b, config.out_channels, plan.latent_grid[0] * p, plan.latent_grid[1] * p, **meta)
    noise, t = torch.empty_like(x0), torch.empty(b, **meta)
    context = torch.empty(b, plan.text_len, config.context_dim, **meta)
    mask = torch.ones(b, plan.text_len, dtype=torch.bool, device="meta")
    saved: Dict[int, torch.Tensor] = {}

    def pack(x):
        if x.device.type == "meta":  # the CPU RNG states of activation recompute are not activations
            base = x if x._base is None else x._base
            saved[id(base)] = base
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), _flash_attention_on_meta(), \
            torch.autocast("cpu", enabled=False):
        if plan.objective == "fm":
            fm_loss(model, x0, noise, t, context, mask)
        else:
            cfg = APEXConfig(variant=plan.apex_variant, **({"w_dm": 1.0} if plan.apex_variant == "released" else {}))
            apex_loss(model, x0, noise, t, context, mask, cfg, generator=torch.Generator(), teacher=teacher, step=10 ** 6)
    return sum(base.untyped_storage().nbytes() for base in saved.values())


def layer_activation_bytes(plan: MemoryPlanConfig) -> Tuple[int, int, int]:
    """(bytes per layer, bytes outside the layers, bytes per layer without recompute) of one
    micro-batch, from traces of 1- and 2-layer models at this TP."""
    def trace(num_layers: int, recompute: Optional[str]) -> int:
        config = _model_config(plan, num_layers=num_layers)
        with fake_parallel_world(plan.tensor_model_parallel_size, 1, 1):
            model = _build_stage(plan, config)
            if recompute:
                enable_activation_recompute(model, recompute)
            teacher = None
            if plan.objective == "apex" and plan.apex_variant == "released" and plan.teacher == "frozen":
                teacher = _build_stage(plan, config).requires_grad_(False)
            return saved_activation_bytes(model, plan, config, teacher)

    one, two = trace(1, plan.recompute), trace(2, plan.recompute)
    plain = trace(2, None) - trace(1, None) if plan.recompute == "full" else two - one
    return two - one, one - (two - one), plain


# ------------------------------------------------------------------------------ the plan
def stage_layers(num_layers: int, pp: int) -> List[int]:
    if num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide the model's {num_layers} layers")
    return [num_layers // pp] * pp


def estimate(plan: MemoryPlanConfig) -> List[StageMemory]:
    """Per-GPU memory of every pipeline stage (tensor-parallel rank 0, data-parallel rank 0)."""
    plan.validate()
    config = _model_config(plan)
    config.validate(plan.tensor_model_parallel_size)
    tp, pp, dp = plan.tensor_model_parallel_size, plan.pipeline_model_parallel_size, plan.data_parallel_size
    layers = stage_layers(config.num_layers, pp)
    per_layer, outside, per_layer_plain = layer_activation_bytes(plan)
    keeps_teacher = plan.objective == "apex" and plan.apex_variant == "released" and plan.teacher == "frozen"
    stages = []
    for stage in range(pp):
        with fake_parallel_world(tp, pp, dp, stage):
            stage_model = _build_stage(plan, config)
            params = list(stage_model.parameters())
        counts = fsdp_state_bytes(stage_model, plan) if plan.fsdp else state_bytes(params, plan)
        weights = counts["weights"]
        # teacher and EMA are frozen copies of the stage (under FSDP sharded like it); under
        # LoRA they share the base's weights and copy only the trainable parameters
        if plan.lora_rank:
            copies = (int(keeps_teacher) + int(plan.ema)) * _bytes(p for p in params if p.requires_grad)
        else:
            copies = weights * (int(keeps_teacher) + int(plan.ema))
        in_flight = min(pp - stage, plan.num_microbatches)
        # with full recompute the backward holds one recomputed layer's activations on top (an
        # upper bound: the CPU's measured peak is ~1/3 lower, as the layer's backward frees
        # them as it goes); selective recompute re-runs only the attention kernel
        working = per_layer_plain if plan.recompute == "full" else 0
        activations = in_flight * (per_layer * layers[stage] + outside) + working
        stages.append(StageMemory(stage=stage, layers=layers[stage], parameters=counts["parameters"],
                                  trainable=counts["trainable"], weights=weights, grads=counts["grads"],
                                  optimizer=counts["optimizer"], copies=copies, activations=activations,
                                  gathered=counts.get("gathered", 0)))
    return stages


def peak(stages: List[StageMemory]) -> StageMemory:
    return max(stages, key=lambda s: s.total)


def format_table(plan: MemoryPlanConfig, stages: List[StageMemory]) -> str:
    def gib(n):
        return f"{n / GIB:.2f}"

    lines = [f"model {plan.model}: TP={plan.tensor_model_parallel_size} PP={plan.pipeline_model_parallel_size} "
             f"DP={plan.data_parallel_size}, micro-batch {plan.micro_batch_size} x {plan.num_microbatches}, "
             f"latent grid {plan.latent_grid[0]}x{plan.latent_grid[1]}, text {plan.text_len}, {plan.objective}"
             + (f" ({plan.apex_variant}, teacher {plan.teacher})" if plan.objective == "apex" else "")
             + (f", LoRA r={plan.lora_rank} ({plan.lora_targets})" if plan.lora_rank else ", full-parameter")
             + f", recompute {plan.recompute or 'none'}"
             + (", sequence parallel" if plan.sequence_parallel else "") + ", "
             + ("FSDP" if plan.fsdp else "distributed optimizer" if plan.distributed_optimizer
                else "replicated optimizer")
             + f", {plan.params_dtype} params", "",
             "| stage | layers | params / GPU | trainable | weights GiB | grads GiB | optimizer GiB | teacher+EMA GiB "
             "| activations GiB | " + ("FSDP gathers GiB | " if plan.fsdp else "") + "total GiB |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if plan.fsdp else "") + "---|"]
    for s in stages:
        lines.append(f"| {s.stage} | {s.layers} | {s.parameters / 1e9:.3f} B | {s.trainable / 1e6:.1f} M | "
                     f"{gib(s.weights)} | {gib(s.grads)} | {gib(s.optimizer)} | {gib(s.copies)} | "
                     f"{gib(s.activations)} | " + (f"{gib(s.gathered)} | " if plan.fsdp else "") + f"{gib(s.total)} |")
    return "\n".join(lines)


def candidate_layouts(gpus: int, config, max_tp: int = 8) -> List[Tuple[int, int, int]]:
    """(tp, pp, dp) with tp*pp*dp = gpus, tp dividing the heads (and at most one node's 8
    GPUs), pp dividing the layers."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > max_tp or gpus % tp or config.num_attention_heads % tp:
            continue
        for pp in range(1, gpus // tp + 1):
            if (gpus // tp) % pp or config.num_layers % pp:
                continue
            out.append((tp, pp, gpus // (tp * pp)))
    return out


def _search_layouts(plan: MemoryPlanConfig, gpus: int, config) -> List[Tuple[Tuple[int, int, int], bool]]:
    """((tp, pp, dp), fsdp) of the search: FSDP only at TP = PP = 1 of a full-parameter plan."""
    out = []
    for tp, pp, dp in candidate_layouts(gpus, config):
        sharded_ok = tp == pp == 1 and not plan.lora_rank
        out += [((tp, pp, dp), fsdp) for fsdp in ((True,) if plan.fsdp else (False, True))
                if sharded_ok or not fsdp]
    return out


def search(plan: MemoryPlanConfig, gpus: int, budget_gib: float, recomputes=(None, "selective", "full")):
    """Every layout of ``gpus`` GPUs (with the least recompute that fits) whose peak stage fits
    the budget, best first. ``plan.sequence_parallel``: the layouts with TP > 1 use it. A
    full-parameter plan also tries FSDP at TP = PP = 1 (``plan.fsdp``: only that layout)."""
    config = _model_config(plan)
    if plan.fsdp and plan.lora_rank:
        raise ValueError(f"--fsdp cannot run with --lora-rank {plan.lora_rank} (FSDP: full-parameter, TP = PP = 1)")
    if plan.sequence_parallel:  # what else refuses it (the model family, LoRA), before any layout is traced
        check_sequence_parallel(config, 2, lora=plan.lora_rank > 0)
    fits = []
    for (tp, pp, dp), fsdp in _search_layouts(plan, gpus, config):
        for recompute in recomputes:
            trial = dataclasses.replace(plan, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                        data_parallel_size=dp, recompute=recompute,
                                        num_microbatches=max(plan.num_microbatches, pp),
                                        sequence_parallel=plan.sequence_parallel and tp > 1, fsdp=fsdp)
            top = peak(estimate(trial))
            if top.total <= budget_gib * GIB:
                fits.append(((tp * pp, (None, "selective", "full").index(recompute), fsdp, pp), trial, top))
                break  # a heavier recompute of the same layout fits too
    # least model parallelism, then least recompute, then plain data parallelism rather than
    # FSDP (which gathers the weights again every step), then tensor rather than pipeline
    # parallelism (inside a node; no pipeline bubble)
    fits.sort(key=lambda f: f[0])
    return [(trial, top) for _, trial, top in fits]

