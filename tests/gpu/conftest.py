"""tests/gpu: checks of the GPU paths on CUDA (docs/gpu.md; tools/gpu_check.sh runs them).

Without CUDA every test here is skipped with the reason. MEGATRON_APEX_GPU_TESTS_ON_CPU=1 runs
them on the CPU instead, to check the tests themselves: what only a GPU has (SDPA's fused
kernels, flash-attn, Transformer Engine, FP8) skips there with its own reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ON_CPU = os.environ.get("MEGATRON_APEX_GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or ON_CPU:
        return
    skip = pytest.mark.skip(reason="CUDA is not available (tests/gpu runs on a GPU: bash tools/gpu_check.sh)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def megatron_single_process():
    if not (torch.cuda.is_available() or ON_CPU):
        yield
        return
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)
    # float32 references must be float32: no TF32 in matmuls or convolutions
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
