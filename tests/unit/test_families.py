"""The family registry is the one place a model family exists: every preset builds through its
family and is found back from its config, its diffusers folder and its name; a family
registered here, and nowhere else, is picked up by the dry run, the memory planner, the layer
spec and the conversion lookups; and the generic modules name no concrete family."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apex import families, gpu
from megatron_apex.conversion import checkpoint_io
from megatron_apex.conversion.engine import TRANSFORMS
from megatron_apex.families import QWEN_IMAGE
from megatron_apex.families.mapping_rules import TRANSFORM_NAMES
from megatron_apex.models.qwen_image.config import QwenImageConfig

REPO = Path(__file__).resolve().parents[2]
BUILTIN = [(family, name) for family in families.families() for name in family.presets]

# A copy of Qwen-Image under new names: its own config class, presets and diffusers class.
COPY_CLASS = "CopyImageTransformer2DModel"


@dataclasses.dataclass
class CopyConfig(QwenImageConfig):
    """Qwen-Image's fields under a type no module outside this test knows."""


def _copy_tiny() -> CopyConfig:
    return CopyConfig(**dataclasses.asdict(QWEN_IMAGE.presets["qwen-image-tiny-test"]()))


COPY = dataclasses.replace(
    QWEN_IMAGE, name="qwen-image-copy", config_class=CopyConfig, presets={"copy-tiny": _copy_tiny},
    default_model_name="copy-tiny", diffusers_class=COPY_CLASS,
    config_to_diffusers=lambda config: {**QWEN_IMAGE.config_to_diffusers(config), "_class_name": COPY_CLASS},
    config_from_diffusers=lambda diffusers_config, **overrides: CopyConfig(**dataclasses.asdict(
        QWEN_IMAGE.config_from_diffusers(diffusers_config, **overrides))))


def register_copy() -> None:
    """COPY in the registry, and its diffusers class in diffusers (when installed) as a model
    with its own name would be: Qwen-Image's transformer under that name."""
    families.register(COPY)
    try:
        import diffusers
    except ImportError:
        return
    setattr(diffusers, COPY_CLASS, type(COPY_CLASS, (diffusers.QwenImageTransformer2DModel,), {}))


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def _write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------- built-in presets
@pytest.mark.parametrize("family, name", BUILTIN, ids=[name for _, name in BUILTIN])
def test_every_preset_builds_through_its_family_and_is_found_back(family, name, tmp_path):
    config = families.get_model_config(name)
    assert type(config) is family.config_class
    assert families.family_of_model_name(name) is family and families.family_of_config(config) is family
    with torch.device("meta"):
        model = family.whole_model(config)
    assert type(model) is family.model_class() and model.num_local_layers == config.num_layers
    assert families.family_of_config(model.model_config) is family

    diffusers_config = json.loads(json.dumps(family.config_to_diffusers(config)))  # as config.json holds it
    assert family.config_from_diffusers(diffusers_config) == config  # the presets keep the APEX defaults
    assert checkpoint_io.family_of_folder(str(_write_config(tmp_path / "stock", diffusers_config))) is family
    apex_folder = _write_config(tmp_path / "apex", {**diffusers_config, "_class_name": f"Apex{family.diffusers_class}"})
    assert checkpoint_io.family_of_folder(str(apex_folder)) is family


def test_engine_applies_every_transform_the_tables_name():
    assert set(TRANSFORMS) == set(TRANSFORM_NAMES)
    for family, name in BUILTIN:
        config = families.get_model_config(name)
        assert {rule.transform for rule in family.mapping_table(config)} <= set(TRANSFORM_NAMES), name


def test_the_registry_refuses_a_family_that_is_not_its_own():
    with pytest.raises(ValueError, match="'qwen-image' is already registered"):
        families.register(QWEN_IMAGE)
    clone = dataclasses.replace(QWEN_IMAGE, name="clone")
    with pytest.raises(ValueError, match=r"shares model names \['qwen-image-20b'.*config class QwenImageConfig, "
                                         r"diffusers class QwenImageTransformer2DModel with 'qwen-image'"):
        families.register(clone)
    with pytest.raises(ValueError, match="default model 'nowhere' is not one of its presets"):
        families.register(dataclasses.replace(COPY, default_model_name="nowhere"))
    assert "clone" not in families.family_names() and COPY.name not in families.family_names()


# ----------------------------------------------------------------------------- a family added here
def test_a_registered_family_is_found_by_every_lookup(tmp_path):
    register_copy()
    try:
        config = families.get_model_config("copy-tiny")
        assert type(config) is CopyConfig and families.family_of_config(config) is COPY
        assert checkpoint_io.get_family("qwen-image-copy") is COPY
        assert checkpoint_io.family_of_folder(str(_write_config(tmp_path / "hf", COPY.config_to_diffusers(config)))) \
            is COPY
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "train_state.json").write_text(json.dumps({"model_name": "copy-tiny"}))
        assert checkpoint_io.family_of_checkpoint(str(ckpt)) is COPY

        spec = families.layer_spec(config, gpu.GpuOptions(transformer_impl="local"))
        assert spec.module is QWEN_IMAGE.layer_spec("local").module
        model = families.build_model(config, spec=spec)
        assert type(model) is QWEN_IMAGE.model_class() and model.model_config is config
        # the same architecture as the preset it copies, counted independently of the copy
        assert families.count_parameters(config) == families.count_parameters("qwen-image-tiny-test")
    finally:
        families.unregister(COPY.name)
    with pytest.raises(ValueError, match="--model 'qwen-image-copy': unknown model family"):
        checkpoint_io.get_family("qwen-image-copy")
    with pytest.raises(ValueError, match="unknown --model 'copy-tiny'"):
        families.get_model_config("copy-tiny")


DRY_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
import test_families
test_families.register_copy()
from megatron_apex.training.dry_run import dry_run, split_dry_run_flags
from megatron_apex.training.memory_estimate import MemoryPlanConfig, estimate
plan = dict(latent_grid=(4, 4), text_len=8, micro_batch_size=2, params_dtype="float32", objective="fm")
stages = {{m: [vars(s) for s in estimate(MemoryPlanConfig(model=m, **plan))]
          for m in ("copy-tiny", "qwen-image-tiny-test")}}
options, flags = split_dry_run_flags(["--dry-run", "--dry-run-latent-grid", "4x4", "--dry-run-text-len", "8",
                                      "--model", "copy-tiny", "--objective", "fm"])
print(json.dumps({{"stages": stages, "dry_run": dry_run(options, flags, 1)}}))
"""


def test_the_dry_run_and_memory_planner_take_a_registered_family():
    """In a process of its own (the planner builds a fake process group): the copy's memory
    plan equals its original's, and the dry run counts it against diffusers' class of its name."""
    pytest.importorskip("diffusers")
    proc = subprocess.run([sys.executable, "-c", DRY_RUN.format(tests=str(REPO / "tests" / "unit"))],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stages"]["copy-tiny"] == out["stages"]["qwen-image-tiny-test"]
    assert out["dry_run"].startswith("dry run: copy-tiny on 1 GPU(s)")
    assert f"parameters (diffusers {COPY_CLASS}, meta device):" in out["dry_run"]
    assert "-> equal" in out["dry_run"]


# ----------------------------------------------------------------------------- the generic modules
GENERIC = ["megatron_apex/gpu.py", "megatron_apex/models/*.py", "megatron_apex/models/common/*.py",
           "megatron_apex/conversion/*.py", "megatron_apex/checkpoint/*.py", "megatron_apex/lora/*.py",
           "megatron_apex/training/dry_run.py", "megatron_apex/training/memory_estimate.py"]


def _concrete_names():
    """Class names and module prefixes that belong to one family."""
    names, modules = set(), set()
    for family in families.families():
        model_class = family.model_class()
        names |= {family.config_class.__name__, model_class.__name__}
        modules |= {model_class.__module__.rsplit(".", 1)[0], family.layer_spec_builder.__module__}
    return names, modules


def _named(tree: ast.AST):
    """Every name, attribute and imported module/name a module's code uses (not its docstrings)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_generic_modules_name_no_concrete_family():
    names, modules = _concrete_names()
    assert {"QwenImageConfig", "SanaConfig", "megatron_apex.models.sana", "megatron_apex.families.qwen_image"} \
        <= names | modules  # the scan looks for what the built-in families are made of
    found = []
    for pattern in GENERIC:
        for path in sorted(REPO.glob(pattern)):
            for used in _named(ast.parse(path.read_text())):
                if used in names or any(used == m or used.startswith(m + ".") for m in modules):
                    found.append(f"{path.relative_to(REPO)}: {used}")
    assert not found, found
