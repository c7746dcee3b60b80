"""Diffusers folders <-> our megatron-core distributed checkpoints, for any registered model
family (megatron_apex/families/): what import (hf_import.py), export (hf_export.py) and verify
(verify.py) share: which family a folder or checkpoint holds, the checks of a folder against
the model its config.json describes, the one-process megatron setup. tools/convert_hf.py is
the command line; docs/conversion.md the user guide.

Errors name the path with the flag the user gave it by (``flag``), as the command line prints them.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from megatron_apex import checkpoint, families
from megatron_apex.conversion import hf_io
from megatron_apex.conversion.engine import EXTRA_STATE_SUFFIX, expand, ours_to_hf
from megatron_apex.families import ModelFamily
from megatron_apex.parallel import init_distributed

APEX_CONFIG_NAME = "megatron_apex_config.json"
EXTRAS_MODES = ("inline", "separate", "drop")
WEIGHTS = ("model", "ema")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
_MAX_LISTED = 12


# ============================================================================ which family
def get_family(name: str) -> ModelFamily:
    """The registered family ``name`` (tools/convert_hf.py --model)."""
    if name not in families.family_names():
        raise ValueError(f"--model {name!r}: unknown model family; choose one of "
                         f"{', '.join(sorted(families.family_names()))} (or {AUTO})")
    return families.get_family(name)


def family_of_folder(folder: str, flag: str = "--hf-path") -> ModelFamily:
    """The family whose diffusers class a folder's ``config.json`` names (``--model auto``)."""
    class_name = hf_io.read_config(folder, flag).get("_class_name")
    family = families.family_of_folder_class(class_name)
    if family is not None:
        return family
    known = ", ".join(f"{f.diffusers_class} (--model {f.name})" for f in families.families())
    raise ValueError(f"{flag} {folder}: config.json _class_name is {families.stock_class_name(class_name)!r}; "
                     f"convertible classes: {known}")


def family_of_checkpoint(load: str, flag: str = "--load") -> ModelFamily:
    """The family of a checkpoint's model (``--model auto`` on export): the registry name its
    train_state.json records."""
    state = checkpoint.read_train_state(checkpoint.resolve_checkpoint(load, flag))
    name = state.get("model_name")
    if name not in families.model_names():
        raise ValueError(f"{flag} {load}: train_state.json names model {name!r}, not a registered model")
    return families.family_of_model_name(name)


def check_family(family: ModelFamily, diffusers_config: Mapping, flag: str, path: str) -> None:
    found = families.stock_class_name(diffusers_config.get("_class_name"))
    if found == family.diffusers_class:
        return
    other = families.family_of_folder_class(found)
    hint = f" (use --model {other.name})" if other is not None and other.name != family.name else ""
    raise ValueError(f"{flag} {path}: config.json _class_name is {found!r}, not {family.diffusers_class!r} "
                     f"as --model {family.name} needs{hint}")


# ============================================================================ shared helpers
def listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def init_single_process() -> None:
    """dist_checkpointing needs a process group; this tool is one process writing every shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("run tools/convert_hf.py as ONE process (not under torchrun): it writes the "
                           "shards of every tensor-parallel rank itself")
    init_distributed(1, 1)


def meta_model(family: ModelFamily, config) -> torch.nn.Module:
    with torch.device("meta"):
        return family.whole_model(config)


def plain_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}


def expected_hf_keys(family: ModelFamily, config) -> Tuple[Dict[str, Tuple[int, ...]], set]:
    """{diffusers key: shape} of the model ``config`` describes (found by converting the
    meta-device model's state dict), and which of those keys are optional extras."""
    table = family.mapping_table(config)
    meta = plain_state(meta_model(family, config))
    hf = ours_to_hf(meta, table, family.num_layers(config), family.transform_context(config))
    optional = {h for _, hf_keys, rule in expand(table, family.num_layers(config)) if rule.optional for h in hf_keys}
    return {k: tuple(v.shape) for k, v in hf.items()}, optional


def check_hf_keys(family: ModelFamily, config, source: hf_io.SafetensorsFolder, flag: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key, before any tensor is read."""
    expected, optional = expected_hf_keys(family, config)
    missing = sorted(k for k in expected if k not in source and k not in optional)
    unexpected = sorted(k for k in source if k not in expected)
    mismatched = sorted(f"{k} {list(source.shape(k))} (expected {list(expected[k])})"
                        for k in expected if k in source and tuple(source.shape(k)) != expected[k])
    not_float = sorted(k for k in source if k in expected and not source.dtype(k).is_floating_point)
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")
    if not_float:
        problems.append(f"non-floating-point tensors: {listing(not_float)}")
    if problems:
        raise ValueError(f"{flag} {source.folder}: the weights do not match the {family.diffusers_class} its "
                         f"config.json describes (with these APEX options): " + "; ".join(problems))


def _apex_side_config(folder: str, family: ModelFamily) -> Dict:
    """Non-architecture fields saved by an earlier export (so export -> import restores them)."""
    path = os.path.join(folder, APEX_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    saved = hf_io.read_json(path, "--hf-path").get("model_config", {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k not in family.arch_fields}


def config_for_folder(family: ModelFamily, folder: str, overrides: Optional[Mapping] = None, flag: str = "--hf-path"):
    """(our config, config.json dict) for a diffusers folder: architecture from config.json,
    APEX fields from the folder's megatron_apex_config.json when present, then ``overrides``."""
    diffusers_config = hf_io.read_config(folder, flag)
    check_family(family, diffusers_config, flag, folder)
    fields = {**_apex_side_config(folder, family), **dict(overrides or {})}
    try:
        config = family.config_from_diffusers(diffusers_config, **fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{flag} {folder}: {err}") from None
    return config, diffusers_config


def progress_bar(total: int, desc: str, enabled: bool):
    """A per-tensor tqdm bar on stderr, silent unless ``enabled``."""
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def counted(items: Iterator, bar) -> Iterator:
    for item in items:
        yield item
        bar.update(1)
