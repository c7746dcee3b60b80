"""Every example recipe dry-runs on the CPU: its printed architecture parameter count equals
diffusers' class built from the registry config here, and the memory plan and the launch
command are printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (REPO / "examples" / "recipes").glob("*.sh") if not p.name.startswith("_"))
# (recipe, its environment): the Sana recipe covers both sizes.
RUNS = [(r, {}) for r in RECIPES if r != "sana_full.sh"] + [("sana_full.sh", {"SANA_SIZE": s}) for s in ("0.6b", "1.6b")]


def diffusers_count(model_name: str) -> int:
    import diffusers

    from megatron_apex.conversion import qwen_image_mapping, sana_mapping
    from megatron_apex.models.registry import get_model_config

    mapping = sana_mapping if model_name.startswith("sana") else qwen_image_mapping
    arch = dict(mapping.config_to_diffusers(get_model_config(model_name)))
    with torch.device("meta"):
        model = getattr(diffusers, arch.pop("_class_name"))(**arch)
    return sum(p.numel() for p in model.parameters())


def test_there_are_recipes_for_the_papers_runs():
    assert {"qwen_image_20b_lora.sh", "qwen_image_20b_full.sh", "sana_full.sh"} <= set(RECIPES)


@pytest.mark.parametrize("recipe, extra_env", RUNS, ids=[f"{r}{''.join(f'-{v}' for v in e.values())}" for r, e in RUNS])
def test_dry_run(recipe, extra_env):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **extra_env}
    proc = subprocess.run(["bash", f"examples/recipes/{recipe}", "--dry-run"], capture_output=True, text=True,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    model = re.search(r"dry run: (\S+) on (\d+) GPU", out).group(1)
    if "SANA_SIZE" in extra_env:
        assert model == f"sana-{extra_env['SANA_SIZE']}"
    ours = int(re.search(r"parameters \(ours, meta device\): ([\d,]+)", out).group(1).replace(",", ""))
    assert ours == diffusers_count(model)
    assert re.search(r"peak per GPU: [\d.]+ GiB", out)
    assert "torch.distributed.run" in out and "examples/pretrain_apex_dit.py" in out
