"""Export a LoRA run's checkpoint for diffusers.

    python tools/export_lora.py --load LORA_RUN --out DIR               # DIR/pytorch_lora_weights.safetensors
    python tools/export_lora.py --load LORA_RUN --out DIR --merged      # a full diffusers transformer folder
        [--pretrained-checkpoint BASE] [--weights auto|model|ema] [--extras ...] [--dtype ...]

The LoRA file loads on the base pipeline with ``pipe.load_lora_weights(DIR)`` (or
``transformer.load_lora_adapter(DIR/pytorch_lora_weights.safetensors, prefix="transformer")``).
The trained target-time embedder (and any other trainable extra) is written beside it, in
DIR/apex_extras.safetensors: the APEX pipelines' ``load_lora_weights``
(megatron_apex.inference.diffusers_apex) load it too and take the trained one-step jump; a
stock pipeline ignores it and takes the velocity head's Euler step (docs/lora.md);
the merged folder (adapters folded into the weights, W + alpha/r B A) is what
``tools/convert_hf.py export`` writes for a full run, merged and written one tensor at a time
(memory: the loaded model plus a tensor). The base comes from the checkpoint's record, or
--pretrained-checkpoint. One process (no torchrun); docs/lora.md.
Exit status: 0 success, 2 bad input (one line naming the flag or file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Runs from a checkout without installing the package, too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.cli import OneLineErrorParser, add_progress_option, show_progress  # noqa: E402

LORA_EXTRAS = ("separate", "drop", "error")
MERGED_EXTRAS = ("inline", "separate", "drop")
LORA_INFO_NAME = "megatron_apex_lora.json"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="export_lora.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="LoRA run: a save directory (follows `latest`) or an iter_* dir")
    p.add_argument("--pretrained-checkpoint", default=None,
                   help="the base weights (default: the base recorded in the LoRA checkpoint)")
    p.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    p.add_argument("--merged", action="store_true",
                   help="write a full diffusers transformer folder with the adapters merged into the weights")
    p.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="adapters of the model or of its EMA (auto: EMA when the run kept one)")
    p.add_argument("--extras", default=None,
                   help="trainable parameters besides the adapters (e.g. the target-time embedder). LoRA file: "
                        "separate (default; beside it in apex_extras.safetensors, which the APEX pipelines load), "
                        "drop (then only plain velocity queries, t_target = t, match) or error. --merged: inline "
                        "(default), separate (apex_extras.safetensors) or drop, as tools/convert_hf.py export")
    p.add_argument("--dtype", default="auto",
                   help="auto (the base's source dtype, else the model's), float32, bfloat16, float16")
    p.add_argument("--max-shard-size", default="5GB", help="--merged: largest safetensors shard, e.g. 5GB, 500MB")
    add_progress_option(p, "--merged: per-tensor")
    return p


def _out_dtype(dtype: str, base_state, model):
    from megatron_apex.conversion.checkpoint_io import DTYPES

    if dtype == "auto":
        source = (base_state or {}).get("source") or {}
        return DTYPES.get(source.get("dtype") or "", next(model.parameters()).dtype)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _diffusers_config(family, config, base_state) -> dict:
    """config.json: the imported base's own when its architecture matches (its diffusers
    version and fields), else the one the family writes for the config."""
    out = family.config_to_diffusers(config)
    original = ((base_state or {}).get("source") or {}).get("diffusers_config")
    if isinstance(original, dict) and original.get("_class_name") == family.diffusers_class and \
            all(original.get(k) == out[k] for k in family.arch_fields):
        return original
    return out


def _info(state, weights, extras) -> dict:
    return {"checkpoint": state["checkpoint"], "iteration": state.get("iteration"), "weights": weights,
            "base": state.get("lora_base"), "lora_config": state["lora"]["config"], "extras": extras,
            "model_name": state.get("model_name"), "model_config": state["model_config"]}


def export_lora_file(model, state, out: str, extras: str, dtype) -> dict:
    from megatron_apex.conversion import hf_io
    from megatron_apex.conversion.lora_diffusers import LORA_WEIGHT_NAME, export_diffusers_lora, unexportable_extras

    extra = unexportable_extras(model)
    dropped = [] if extras == "separate" else extra
    beside = [hf_io.EXTRAS_NAME] if extras == "separate" and extra else []
    with hf_io.atomic_output_dir(out, "--out") as tmp:
        export_diffusers_lora(model, tmp, extras=extras, dtype=dtype)
        with open(os.path.join(tmp, LORA_INFO_NAME), "w") as f:
            json.dump({**_info(state, state["weights"], extras), "dropped_extras": dropped,
                       "extras_file": beside[0] if beside else None, "extras_beside": extra if beside else []},
                      f, indent=1, sort_keys=True)
            f.write("\n")
    return {"files": [LORA_WEIGHT_NAME, *beside, LORA_INFO_NAME], "dropped": dropped,
            "beside": extra if beside else []}


def merged_tensors(model):
    """(our state dict with every adapted weight as W + scale * B A, made when it is read;
    the same keys as meta tensors). Adapter entries are left out; nothing is copied here, so
    the export holds the model and one merged tensor at a time."""
    import torch

    from megatron_apex.conversion.engine import LazyStateDict
    from megatron_apex.conversion.lora_diffusers import check_whole_model
    from megatron_apex.lora.adapters import ADAPTER_PARAMS, iter_lora_modules, merged_weight
    from megatron_apex.lora.apply import unwrap

    root = unwrap(model)
    check_whole_model(root, "merged export", allow_tp=False)
    real, meta = LazyStateDict(), LazyStateDict()
    for key, tensor in root.state_dict().items():  # references to the parameters, not copies
        real[key] = tensor
        # (megatron's *._extra_state entries may be None; the export skips them)
        meta[key] = torch.empty_like(tensor, device="meta") if isinstance(tensor, torch.Tensor) else tensor
    for name, module in iter_lora_modules(root):
        prefix = f"{name}." if name else ""
        for key in ADAPTER_PARAMS:
            for sd in (real, meta):
                sd.pop(prefix + key, None)

        def merge(module=module):
            with torch.no_grad():
                return merged_weight(module)

        real.set_recipe(prefix + "weight", merge)
    return real, meta


def export_merged(model, state, out: str, extras: str, dtype, max_shard_size: str, progress: bool = False) -> dict:
    from megatron_apex import checkpoint
    from megatron_apex.conversion import hf_io
    from megatron_apex.conversion.checkpoint_io import APEX_CONFIG_NAME
    from megatron_apex.conversion.hf_export import write_hf_transformer
    from megatron_apex.conversion.lora_diffusers import resolve_family

    shard_bytes = hf_io.parse_size(max_shard_size)
    family = resolve_family(model)
    config = model.model_config
    base = state.get("lora_base")
    base_state = checkpoint.read_train_state(base) if base else None
    real, meta = merged_tensors(model)
    with hf_io.atomic_output_dir(out, "--out") as tmp:
        files, written_extras = write_hf_transformer(tmp, family, config, lambda is_meta: meta if is_meta else real,
                                                     dtype, extras, shard_bytes, source="the merged model state dict",
                                                     progress=progress)
        with open(os.path.join(tmp, hf_io.CONFIG_NAME), "w") as f:
            json.dump(_diffusers_config(family, config, base_state), f, indent=2, sort_keys=True)
            f.write("\n")
        with open(os.path.join(tmp, APEX_CONFIG_NAME), "w") as f:
            json.dump({"family": family.name, **_info(state, state["weights"], extras),
                       "extra_keys": written_extras, "dtype": str(dtype).replace("torch.", ""), "merged_lora": True},
                      f, indent=1, sort_keys=True)
            f.write("\n")
    return {"files": files + [hf_io.CONFIG_NAME, APEX_CONFIG_NAME], "extras": written_extras}


def run(a) -> int:
    from megatron_apex import checkpoint
    from megatron_apex.conversion import hf_io
    from megatron_apex.inference.loading import load_model_for_inference

    extras_modes = MERGED_EXTRAS if a.merged else LORA_EXTRAS
    extras = a.extras or extras_modes[0]
    if extras not in extras_modes:
        raise ValueError(f"--extras {extras!r}: choose one of {', '.join(extras_modes)}"
                         f"{' (with --merged)' if a.merged else ' (LoRA file; --merged takes inline/separate/drop)'}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run tools/export_lora.py as ONE process (not under torchrun)")
    start = time.time()
    ckpt = checkpoint.resolve_checkpoint(a.load, "--load")
    if not checkpoint.read_train_state(ckpt).get("lora"):
        raise ValueError(f"--load {ckpt}: a full checkpoint (no LoRA adapters); export it with tools/convert_hf.py "
                         "export")
    hf_io.check_output_path(a.out, "--out")
    if a.merged:
        hf_io.parse_size(a.max_shard_size)
    model, state = load_model_for_inference(a.load, a.weights, a.pretrained_checkpoint)
    base = state.get("lora_base")
    dtype = _out_dtype(a.dtype, checkpoint.read_train_state(base) if base else None, model)
    what = f"{state['weights']} adapters of {state['checkpoint']} on {base or 'its randomly initialised base'}"
    if a.merged:
        result = export_merged(model, state, a.out, extras, dtype, a.max_shard_size, progress=show_progress(a))
        print(f"export_lora.py: wrote {a.out} (merged diffusers folder, {len(result['files'])} files, "
              f"{str(dtype).replace('torch.', '')}, {len(result['extras'])} APEX extra keys {extras}) from the {what} "
              f"in {time.time() - start:.1f}s")
    else:
        result = export_lora_file(model, state, a.out, extras, dtype)
        dropped = f"; left out (no place in a LoRA file): {', '.join(result['dropped'])}" if result["dropped"] else ""
        beside = (f"; beside it in {result['files'][1]} (the APEX pipelines' load_lora_weights loads them): "
                  f"{', '.join(result['beside'])}") if result["beside"] else ""
        print(f"export_lora.py: wrote {os.path.join(a.out, result['files'][0])} from the {what} in "
              f"{time.time() - start:.1f}s{dropped}{beside}")
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"export_lora.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from megatron_apex.conversion.hf_io import return_freed_memory_promptly

    return_freed_memory_promptly()  # RSS = what the streaming holds (see its docstring)
    sys.exit(main())
