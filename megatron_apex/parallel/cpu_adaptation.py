"""The one place where megatron-core is adapted to run on a CPU-only torch with gloo.

megatron-core 0.16 assumes CUDA throughout (hard-coded ``device="cuda"``, ``.cuda()``,
``torch.cuda.current_device()``, CUDA RNG state, ``torch.cuda.*Tensor`` type checks).
Without CUDA every named adaptation below is applied once per process; with CUDA nothing is
touched. Each adaptation can be reverted, which is how the tests prove it is needed.

- ``device_redirect``: a ``TorchFunctionMode`` (entered once per thread) maps every CUDA
  device argument ("cuda", "cuda:N", torch.device("cuda"), an int id) to the CPU in factory
  functions, ``.to(...)``, ``.cuda()``, ``new_*``; pinned-memory requests become plain
  memory. Fixes schedules' ``torch.zeros(device="cuda")``, p2p and grad buffers, the global
  memory buffer, optimizer scalars.
- ``cuda_type_names``: in the same mode, ``Tensor.type()`` reports ``torch.cuda.*`` names
  and ``.type("torch.cuda.X")`` converts to ``torch.X``. Fixes the clip_grads
  ``.type() == 'torch.cuda.FloatTensor'`` assert and the (distributed) optimizer's
  parameter classification.
- ``mode_in_backward``: the mode is popped while its own handler runs, and
  ``Tensor.backward``/``torch.autograd.backward`` are torch functions, so the autograd engine
  would run megatron's custom backward functions, activation recompute and DDP grad hooks
  without the redirection; the engine call is wrapped to re-enter the mode.
- ``cuda_current_device``: ``torch.cuda.current_device()`` answers 0, which the redirect
  maps to the CPU. Fixes gather_output/sequence gathers, the global memory buffer,
  param_and_grad_buffer, p2p shape buffers, RoPE.
- ``cuda_synchronize``: ``torch.cuda.synchronize()`` is a no-op (CPU ops are synchronous).
  Fixes p2p batch_isend_irecv and dist_checkpointing's filesystem_async preload.
- ``cpu_rng``: the "CUDA" generator is the CPU generator: ``torch.cuda`` seed/state
  functions and tensor_parallel.random's tracker (model_parallel_cuda_manual_seed,
  get_cuda_rng_tracker().fork(), activation-recompute state) use the CPU generator.
- ``unintercepted_model_math``: not a fix but the cost of the fixes: at TP=1 the forward of
  our models (QwenImageModel, SanaModel) runs with the mode popped, since its math needs no
  redirection and the mode's per-op Python handler made it 1.17x diffusers' forward.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.cuda.random as cuda_random
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode_temporarily

from megatron_apex.models.qwen_image.model import QwenImageModel
from megatron_apex.models.sana.model import SanaModel

EXCLUDE_ENV = "MEGATRON_APEX_CPU_ADAPTATIONS_EXCLUDE"

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Adaptation:
    name: str
    why: str
    apply: Callable[[], None]
    revert: Callable[[], None]


# ---------------------------------------------------------------------------------------------
# device_redirect + cuda_type_names: one TorchFunctionMode, two independent switches


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # torch reads a bare int device as a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device arguments to the CPU and answers ``.type()`` with CUDA names."""

    redirect_devices = False
    cuda_type_names = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.redirect_devices:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": _CPU}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
            elif func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]
        if self.cuda_type_names and func is torch.Tensor.type:
            target = args[1] if len(args) > 1 else kwargs.get("dtype")
            if target is None:
                name = func(*args, **kwargs)
                return "torch.cuda." + name[len("torch."):] if args[0].device.type == "cpu" else name
            if isinstance(target, str) and target.startswith("torch.cuda."):
                kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
                args = (args[0], "torch." + target[len("torch.cuda."):], *args[2:])
        return func(*args, **kwargs)


_MODE = CudaToCpuMode()


def _mode_active_in_this_thread() -> bool:
    return any(m is _MODE for m in _get_current_function_mode_stack())


def _ensure_mode_entered() -> None:
    # The torch-function mode stack is thread-local: every thread that runs megatron code
    # enters the mode once (apply_cpu_adaptations() does it) and never leaves it.
    if not _mode_active_in_this_thread():
        _MODE.__enter__()


def _mode_switch(attr: str) -> tuple[Callable[[], None], Callable[[], None]]:
    def apply():
        setattr(_MODE, attr, True)
        _ensure_mode_entered()

    def revert():
        setattr(_MODE, attr, False)

    return apply, revert


# ---------------------------------------------------------------------------------------------
# Attribute patches (module functions), recorded so they can be reverted


class _Patch:
    def __init__(self, targets: Callable[[], list[tuple[object, str, object]]]):
        self._targets = targets
        self._saved: list[tuple[object, str, object]] = []

    def apply(self) -> None:
        if self._saved:
            return
        for owner, attr, value in self._targets():
            self._saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, value)

    def revert(self) -> None:
        for owner, attr, old in reversed(self._saved):
            setattr(owner, attr, old)
        self._saved.clear()


def _current_device() -> int:
    return 0


def _synchronize(device=None) -> None:
    return None


_current_device_patch = _Patch(lambda: [(torch.cuda, "current_device", _current_device)])
_synchronize_patch = _Patch(lambda: [(torch.cuda, "synchronize", _synchronize)])


# --- mode_in_backward --------------------------------------------------------------------------


def _engine_targets() -> list[tuple[object, str, object]]:
    # A mode is popped while its handler runs, and Tensor.backward/torch.autograd.backward/grad
    # are torch functions: the autograd engine they call (custom Function.backward, activation
    # recompute, DDP grad hooks) would run without the redirection. Put the mode back around
    # the engine call; torch.autograd calls the engine through this module-level name.
    engine = getattr(torch.autograd, "_engine_run_backward", None)
    if engine is None:
        raise RuntimeError("torch.autograd._engine_run_backward is gone in this torch version: "
                           "megatron_apex.parallel.cpu_adaptation needs another hook for backward")

    def run_backward_under_mode(*args, **kwargs):
        if _mode_active_in_this_thread():
            return engine(*args, **kwargs)
        with _MODE:
            return engine(*args, **kwargs)

    return [(torch.autograd, "_engine_run_backward", run_backward_under_mode)]


_engine_patch = _Patch(_engine_targets)


# --- cpu_rng ---------------------------------------------------------------------------------


def _cpu_manual_seed(seed) -> None:
    # Not torch.manual_seed: that one calls torch.cuda.manual_seed_all itself.
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device="cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device="cuda") -> None:
    torch.set_rng_state(new_state)


def _mcore_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy


def _mcore_set_rng_state(new_state, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_tracker_class():
    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """megatron's RNG tracker over the CPU generator (same names, seeds and fork contract)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(int(seed)).get_state()

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Unlike the CUDA tracker there is no separate CPU state to watch: the forked
            # state IS the CPU generator while inside the context.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(f"current state name {self._current_state_name} is not the same as "
                                    f"the desired state name {name}.")
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    CpuRNGStatesTracker.__qualname__ = CpuRNGStatesTracker.__name__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


_CPU_TRACKER_CLASS = None


def _rng_targets() -> list[tuple[object, str, object]]:
    global _CPU_TRACKER_CLASS
    if _CPU_TRACKER_CLASS is None:
        _CPU_TRACKER_CLASS = _cpu_tracker_class()
    targets = []
    for module in (torch.cuda, cuda_random):
        targets += [
            (module, "manual_seed", _cpu_manual_seed),
            (module, "manual_seed_all", _cpu_manual_seed),
            (module, "get_rng_state", _cpu_get_rng_state),
            (module, "set_rng_state", _cpu_set_rng_state),
        ]
    targets += [
        (mcore_random, "_get_cuda_rng_state", _mcore_get_rng_state),
        (mcore_random, "_set_cuda_rng_state", _mcore_set_rng_state),
        (mcore_random, "CudaRNGStatesTracker", _CPU_TRACKER_CLASS),
    ]
    return targets


_rng_patch = _Patch(_rng_targets)


def _reset_rng_tracker() -> None:
    # A tracker built before the switch holds states of the other kind: drop it; the next
    # get_cuda_rng_tracker()/model_parallel_cuda_manual_seed builds one of the right class.
    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def _apply_rng() -> None:
    _rng_patch.apply()
    _reset_rng_tracker()


def _revert_rng() -> None:
    _rng_patch.revert()
    _reset_rng_tracker()


# --- unintercepted_model_math ------------------------------------------------------------------


@contextlib.contextmanager
def _mode_popped() -> Iterator[None]:
    stack = _get_current_function_mode_stack()
    if stack and stack[-1] is _MODE:
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _model_forward_targets() -> list[tuple[object, str, object]]:
    # The mode's Python handler runs for every torch call, ~15% of a tiny model's forward
    # (docs/benchmarks.md). Our models' own math allocates nothing on "cuda"; only megatron's
    # tensor-parallel gathers do (torch.cuda.current_device()), and those are no-ops at TP=1.
    # So at TP=1 the model's forward runs without the mode; backward re-enters it for
    # megatron's custom backward functions and grad hooks (mode_in_backward).
    def unintercepted(forward):
        def wrapper(self, *args, **kwargs):
            if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
                return forward(self, *args, **kwargs)
            with _mode_popped():
                return forward(self, *args, **kwargs)

        wrapper.__wrapped__ = forward
        wrapper.__doc__ = forward.__doc__
        return wrapper

    return [(cls, "forward", unintercepted(cls.forward)) for cls in (QwenImageModel, SanaModel)]


_model_forward_patch = _Patch(_model_forward_targets)


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Adaptation] = {
    a.name: a
    for a in [
        Adaptation("device_redirect",
                   "megatron allocates with device='cuda'/.cuda()/current_device(); send those to the CPU",
                   *_mode_switch("redirect_devices")),
        Adaptation("cuda_type_names",
                   "clip_grads and the optimizers accept only tensors whose .type() is 'torch.cuda.*'",
                   *_mode_switch("cuda_type_names")),
        Adaptation("mode_in_backward",
                   "the autograd engine (custom backward, recompute, grad hooks) runs with torch-function modes popped",
                   _engine_patch.apply, _engine_patch.revert),
        Adaptation("cuda_current_device",
                   "torch.cuda.current_device() raises without CUDA; answer 0 (redirected to the CPU)",
                   _current_device_patch.apply, _current_device_patch.revert),
        Adaptation("cuda_synchronize",
                   "p2p communication and dist_checkpointing call torch.cuda.synchronize(); CPU work is synchronous",
                   _synchronize_patch.apply, _synchronize_patch.revert),
        Adaptation("cpu_rng",
                   "megatron's model-parallel RNG tracker reads CUDA RNG state; track the CPU generator instead",
                   _apply_rng, _revert_rng),
        Adaptation("unintercepted_model_math",
                   "the device-redirect mode costs ~15% of the forward; at TP=1 our models' forward runs without it",
                   _model_forward_patch.apply, _model_forward_patch.revert),
    ]
}

_applied: list[str] = []
_suspended: set[str] = set()
_lock = threading.RLock()


def adaptation_names() -> list[str]:
    """Every adaptation this module knows, in the order they are applied."""
    return list(_REGISTRY)


def adaptation_reasons() -> dict[str, str]:
    """name -> one line saying which megatron-core path needs it."""
    return {name: a.why for name, a in _REGISTRY.items()}


def applied_adaptations() -> list[str]:
    return list(_applied)


def _check_names(names: Iterable[str], source: str) -> list[str]:
    names = [n for n in names if n]
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"{source}: unknown CPU adaptation(s) {unknown}; known: {adaptation_names()}")
    return names


def apply_cpu_adaptations(exclude: Iterable[str] = ()) -> list[str]:
    """Adapt megatron-core to a CPU-only torch; returns the names applied (idempotent).

    Does nothing when CUDA is available. ``exclude`` (or the comma-separated environment
    variable MEGATRON_APEX_CPU_ADAPTATIONS_EXCLUDE) leaves named adaptations out, for tests and
    diagnosis; it does not revert ones already applied (``suspended`` does). Call it again
    from any new thread that runs megatron code: the device redirection is a torch-function
    mode, and those are per thread.
    """
    if torch.cuda.is_available():
        return []
    excluded = set(_check_names(exclude, "exclude"))
    excluded |= set(_check_names(os.environ.get(EXCLUDE_ENV, "").split(","), EXCLUDE_ENV))
    with _lock:
        for name, adaptation in _REGISTRY.items():
            if name in excluded or name in _applied or name in _suspended:
                continue
            adaptation.apply()
            _applied.append(name)
        if _MODE.redirect_devices or _MODE.cuda_type_names:
            _ensure_mode_entered()
        return applied_adaptations()


@contextlib.contextmanager
def suspended(*names: str) -> Iterator[None]:
    """Temporarily revert applied adaptations (to show what breaks without them).

    apply_cpu_adaptations() called inside the block leaves them out too.
    """
    names = _check_names(names, "suspended")
    with _lock:
        active = [n for n in names if n in _applied and n not in _suspended]
        for name in active:
            _REGISTRY[name].revert()
            _applied.remove(name)
            _suspended.add(name)
    try:
        yield
    finally:
        with _lock:
            for name in active:
                _suspended.discard(name)
                _REGISTRY[name].apply()
                _applied.append(name)
            _applied.sort(key=adaptation_names().index)
