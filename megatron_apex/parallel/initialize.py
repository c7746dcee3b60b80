"""Process group + megatron parallel_state setup: nccl with CUDA, gloo (CPU-adapted) without."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_apex.parallel.cpu_adaptation import apply_cpu_adaptations
from megatron_apex.parallel.random import set_seed

# A test harness shortens every collective timeout with this (the smaller value wins), so a
# failing rank does not keep the others waiting for minutes.
TIMEOUT_ENV = "MEGATRON_APEX_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device


def get_device() -> torch.device:
    """This process's compute device: cuda:LOCAL_RANK with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _positive(value, flag: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _info() -> ParallelInfo:
    return ParallelInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        device=get_device())


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, *,
                     timeout_s: float = 120, seed: int | None = None) -> ParallelInfo:
    """Join (or create) the process group and initialise megatron's parallel_state.

    Under torchrun, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT come from the
    environment; without them this runs as a single process on 127.0.0.1 and a free port.
    Calling it again with the same sizes returns at once (other sizes re-initialise
    parallel_state on the existing process group). ``seed`` calls set_seed afterwards.
    """
    tp = _positive(tensor_model_parallel_size, "--tensor-model-parallel-size")
    pp = _positive(pipeline_model_parallel_size, "--pipeline-model-parallel-size")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if os.environ.get(TIMEOUT_ENV):
        try:
            timeout_s = min(timeout_s, float(os.environ[TIMEOUT_ENV]))
        except ValueError:
            raise ValueError(f"environment variable {TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number") from None

    if dist.is_initialized():
        world_size = dist.get_world_size()
    elif "RANK" in os.environ:
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("environment variable RANK is set but WORLD_SIZE is not (launch with torchrun)")
        world_size = _env_int("WORLD_SIZE")
    else:
        world_size = 1
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp}) = {tp * pp} "
            f"does not divide the world size ({world_size})")

    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_adaptations()

    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(get_device())
        backend = "nccl" if cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", rank=_env_int("RANK"),
                                    world_size=world_size, timeout=timeout)
        else:
            # A process on its own needs no TCP rendezvous: an in-memory store cannot race another
            # process for a port (a free port picked here can be taken before it is bound).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)

    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return _seeded_info(seed)
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)))
    return _seeded_info(seed)


def _seeded_info(seed: int | None) -> ParallelInfo:
    if seed is not None:
        set_seed(seed)
    return _info()


def destroy_distributed() -> None:
    """Tear down megatron's parallel_state and the default process group (safe to repeat)."""
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
