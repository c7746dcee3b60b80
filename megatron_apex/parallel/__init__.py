"""Distributed init, seeding, and the one place megatron-core is adapted to a CPU-only torch."""

from megatron_apex.parallel.cpu_adaptation import (
    adaptation_names,
    adaptation_reasons,
    applied_adaptations,
    apply_cpu_adaptations,
)
from megatron_apex.parallel.initialize import ParallelInfo, destroy_distributed, get_device, init_distributed
from megatron_apex.parallel.random import set_seed

__all__ = [
    "ParallelInfo",
    "adaptation_names",
    "adaptation_reasons",
    "applied_adaptations",
    "apply_cpu_adaptations",
    "destroy_distributed",
    "get_device",
    "init_distributed",
    "set_seed",
]
