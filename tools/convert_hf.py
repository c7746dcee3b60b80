"""Convert between diffusers transformer folders and megatron_apex checkpoints.

    python tools/convert_hf.py import --model qwen-image --hf-path HF_DIR --save CKPT_DIR \\
        [--tensor-model-parallel-size T --pipeline-model-parallel-size P]
    python tools/convert_hf.py export --model qwen-image --load CKPT_DIR --hf-path OUT_DIR \\
        [--weights model|ema --max-shard-size 5GB --dtype auto --extras inline|separate|drop]
        [--base-pipeline PIPELINE_DIR]   (then OUT_DIR is a whole pipeline with our transformer/)
    python tools/convert_hf.py verify --model qwen-image --hf-path HF_DIR [--load CKPT_DIR] \\
        [--batch 2 --grid 4x4 --text-len 8 --seed 0 --tolerance 1e-5]

--model is the family: qwen-image (QwenImageTransformer2DModel), sana (SanaTransformer2DModel),
or auto (the default: config.json's _class_name on import/verify, the checkpoint's registry
model on export).

One process does every conversion (no torchrun), tensor by tensor; see docs/conversion.md.
Exit status: 0 success, 1 verify above tolerance, 2 bad input (one line naming the flag).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runs from a checkout without installing the package, too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.cli import OneLineErrorParser, add_progress_option, show_progress  # noqa: E402
from megatron_apex.conversion import checkpoint_io, hf_export, hf_import, verify  # noqa: E402
from megatron_apex.conversion.hf_io import SafetensorsFolder, return_freed_memory_promptly  # noqa: E402
from megatron_apex.inference.loading import load_model_for_inference  # noqa: E402


def _grid(text: str):
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW of positive integers, e.g. 4x6")
    return int(parts[0]), int(parts[1])


def _model_options(p) -> None:
    g = p.add_argument_group("APEX options of the imported model (give the trainer the same flags)")
    g.add_argument("--shift-site", choices=("input", "projected"), help="where c_fake = A c + b is applied")
    g.add_argument("--shift-kind", choices=("scalar", "diagonal", "full"))
    g.add_argument("--shift-a", type=float)
    g.add_argument("--shift-b", type=float)
    g.add_argument("--target-time-embedder", choices=("none", "copy", "zero"),
                   help="any-step target-time embedder (Qwen-Image: time_text_embed_2, Sana: time_embed_2) when the "
                        "folder lacks it: none, a copy of the time embedder, or zero last linear (default: the model "
                        "default, zero)")


def _overrides(a) -> dict:
    out = {}
    for flag in ("shift_site", "shift_kind", "shift_a", "shift_b"):
        if getattr(a, flag, None) is not None:
            out[flag] = getattr(a, flag)
    if getattr(a, "target_time_embedder", None) is not None:
        out["target_time_embedder"] = a.target_time_embedder != "none"
        if a.target_time_embedder != "none":
            out["target_time_init"] = a.target_time_embedder
    return out


MODEL_HELP = "model family: qwen-image, sana or auto (detected; the default)"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="convert_hf.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    imp = sub.add_parser("import", help="diffusers folder -> megatron_apex checkpoint")
    imp.add_argument("--model", default="auto", help=MODEL_HELP)
    imp.add_argument("--hf-path", required=True, help="diffusers transformer folder (config.json + safetensors)")
    imp.add_argument("--save", required=True, help="new checkpoint directory (must not exist or be empty)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--model-name", default=None,
                     help="registry name recorded in the checkpoint (default: the matching registry entry)")
    imp.add_argument("--report-memory", action="store_true", help="print peak RSS against the model size")
    add_progress_option(imp)
    _model_options(imp)

    exp = sub.add_parser("export", help="megatron_apex checkpoint -> diffusers folder")
    exp.add_argument("--model", default="auto", help=MODEL_HELP)
    exp.add_argument("--load", required=True, help="checkpoint: a save directory (follows `latest`) or an iter_* dir")
    exp.add_argument("--hf-path", required=True,
                     help="new diffusers transformer folder, or with --base-pipeline the new pipeline folder "
                          "(must not exist or be empty)")
    exp.add_argument("--weights", choices=("model", "ema"), default="model")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    exp.add_argument("--dtype", default="auto",
                     help="auto (the imported folder's dtype, else the checkpoint's), float32, bfloat16, float16")
    exp.add_argument("--extras", choices=("inline", "separate", "drop"), default="inline",
                     help="APEX keys diffusers does not know: in the shards (diffusers warns and ignores them), "
                          "in apex_extras.safetensors, or not at all")
    exp.add_argument("--base-pipeline", default=None,
                     help="a diffusers pipeline folder (model_index.json): --hf-path becomes a whole pipeline with "
                          "its other components (copied; links out of the base are refused) and our "
                          "transformer/")
    exp.add_argument("--report-memory", action="store_true", help="print peak RSS against the model size")
    add_progress_option(exp)

    ver = sub.add_parser("verify", help="compare diffusers' forward with ours")
    ver.add_argument("--model", default="auto", help=MODEL_HELP)
    ver.add_argument("--hf-path", required=True, help="diffusers transformer folder")
    ver.add_argument("--load", default=None, help="our checkpoint to compare (default: convert --hf-path in memory)")
    ver.add_argument("--weights", choices=("model", "ema"), default="model")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--grid", type=_grid, default=(4, 4), help="image token grid HxW (latent size / patch size)")
    ver.add_argument("--text-len", type=int, default=8)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--tolerance", type=float, default=1e-5, help="largest max-abs difference that passes")
    return p


def _require_dir(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path}: not a directory")


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _report_memory(baseline: int, folder: str) -> None:
    """Peak RSS of this process (and of the largest child: megatron's checkpoint writers are
    forked and share the parent's pages) against the size of the weights converted."""
    import resource

    with SafetensorsFolder(folder) as f:
        sizes = [_numel(f.shape(k)) * f.dtype(k).itemsize for k in f]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    model, largest = sum(sizes), max(sizes)
    gb = 1e9
    print(f"convert_hf.py memory: HF weights {model / gb:.3f} GB (largest tensor {largest / 1e6:.1f} MB); "
          f"RSS before conversion {baseline / gb:.3f} GB, peak {peak / gb:.3f} GB "
          f"(peak - before = {(peak - baseline) / model:.2f} x the weights, "
          f"{(peak - baseline) / largest:.1f} x the largest tensor); largest child process peak {children / gb:.3f} GB")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _family(a):
    if a.model != checkpoint_io.AUTO:
        return checkpoint_io.get_family(a.model)
    if a.command == "export":
        _require_dir(a.load, "--load")
        return checkpoint_io.family_of_checkpoint(a.load)
    _require_dir(a.hf_path, "--hf-path")
    return checkpoint_io.family_of_folder(a.hf_path)


def _loading_hint(pipeline_class: str) -> str:
    if not pipeline_class.startswith("Apex"):
        return ""
    return (f" (load with megatron_apex.inference.diffusers_apex.{pipeline_class}.from_pretrained, or "
            "DiffusionPipeline.from_pretrained after importing that module; docs/conversion.md)")


def run(a) -> int:
    family = _family(a)
    baseline = 0
    if getattr(a, "report_memory", False):  # the baseline includes the libraries the conversion loads
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron_apex.checkpoint  # noqa: F401
        import megatron_apex.models.qwen_image.model  # noqa: F401
        import megatron_apex.models.sana.model  # noqa: F401

        baseline = _rss_bytes()
    start = time.time()
    if a.command == "import":
        _require_dir(a.hf_path, "--hf-path")
        state = hf_import.import_hf(family, a.hf_path, a.save, a.tensor_model_parallel_size,
                                        a.pipeline_model_parallel_size, _overrides(a), a.model_name,
                                        progress=show_progress(a))
        match = state["source"]["registry_match"]
        if match == "none":
            how = ("no registry model has this architecture: tools/sample.py loads it as is; to train it, give the "
                   "trainer a --model and flags that rebuild its config (docs/conversion.md)")
        else:
            how = f"train from it with --model {state['model_name']} --load {a.save} --finetune"
            if match == "architecture":
                how += " and the APEX flags used here (the registry entry's APEX options differ)"
        print(f"convert_hf.py: wrote {a.save} (iter_0000000, TP={a.tensor_model_parallel_size} "
              f"PP={a.pipeline_model_parallel_size}) from {a.hf_path} in {time.time() - start:.1f}s; {how}")
        if a.report_memory:
            _report_memory(baseline, a.hf_path)
        return 0
    if a.command == "export":
        _require_dir(a.load, "--load")
        result = hf_export.export_hf(family, a.load, a.hf_path, a.weights, a.max_shard_size, a.dtype, a.extras,
                                     a.base_pipeline, progress=show_progress(a))
        where = a.hf_path
        if a.base_pipeline is not None:
            where = os.path.join(a.hf_path, "transformer")
            base = result["base_pipeline"]
            print(f"convert_hf.py: pipeline {a.hf_path} from {a.base_pipeline}: {base['files']} files copied "
                  f"({base['bytes'] / 2**20:.1f} MiB), transformer/ exported; model_index.json names "
                  f"{base['pipeline_class']}{_loading_hint(base['pipeline_class'])}")
        print(f"convert_hf.py: wrote {where} ({len(result['files'])} files, {result['dtype']}, "
              f"{result['weights']} weights of {result['checkpoint']}; {len(result['extras'])} APEX extra keys "
              f"{a.extras}) in {time.time() - start:.1f}s")
        if a.report_memory:
            _report_memory(baseline, where)
        return 0
    _require_dir(a.hf_path, "--hf-path")
    if a.load is not None:
        _require_dir(a.load, "--load")
    if not a.tolerance >= 0:
        raise ValueError(f"--tolerance must be >= 0, got {a.tolerance}")
    result = verify.verify(family, a.hf_path, a.load, a.weights, a.batch, a.grid, a.text_len, a.seed,
                           load_model=load_model_for_inference)
    ok = result["max_abs_diff"] <= a.tolerance
    print(f"convert_hf.py verify: max abs diff {result['max_abs_diff']:.3e} (reference max abs "
          f"{result['ref_max_abs']:.3e}, output {list(result['shape'])}); tolerance {a.tolerance:g}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"convert_hf.py {a.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    return_freed_memory_promptly()  # RSS = what the streaming holds (see its docstring)
    sys.exit(main())
