"""Peak memory of tools/convert_hf.py import and export against the model and its largest tensor.

    python tools/measure_conversion_memory.py --workdir /tmp/convmem \\
        [--layers 3 8 --heads 12 --head-dim 128 --dtype float32 --tp 2 --max-shard-size 200MB]

For each --layers value it writes a Qwen-Image diffusers folder with random weights (one tensor
at a time, so it needs no memory of the model's size), then runs, each in a fresh process
under ``/usr/bin/time -v``, import at TP = 1 (and --tp), export with the default
--max-shard-size (5GB: at most one shard, the case a buffering writer pays most for) and
export with --max-shard-size. The same commands on a tiny model (kilobytes of weights) give
the baseline: interpreter, torch, megatron, the process group. The table reports peak RSS,
peak minus baseline, and that as a multiple of the weights and of the largest tensor; peak
minus baseline that stays put as --layers grows is what streaming means. Prints the commands it
runs; docs/conversion.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_apex.cli import OneLineErrorParser  # noqa: E402

TIME = "/usr/bin/time"
_MAXRSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")
TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=64,
            axes_dims_rope=(4, 6, 6))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="measure_conversion_memory.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="scratch directory (created; its contents are replaced)")
    p.add_argument("--layers", type=int, nargs="+", default=[3], help="model depths to measure")
    p.add_argument("--heads", type=int, default=12, help="attention heads (hidden size = heads x head dim)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the HF weights")
    p.add_argument("--tp", type=int, default=2, help="also import at this tensor-parallel size (1: skip)")
    p.add_argument("--max-shard-size", default="200MB", help="the second export's shard size")
    return p


def _peak_rss(cmd: List[str]) -> int:
    """Peak RSS in bytes of ``cmd`` run in a fresh process (its own and that of any child it
    waits for), from /usr/bin/time -v, or from wait4's rusage where that binary is missing."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    if os.path.exists(TIME):
        print("$", TIME, "-v", " ".join(cmd), flush=True)
        proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return int(_MAXRSS.search(proc.stderr).group(1)) * 1024
    print("$", " ".join(cmd), "(rusage from wait4)", flush=True)
    child = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def _commands(hf: str, out: str, tp: int, shard: str) -> List[Tuple[str, List[str]]]:
    tool = [sys.executable, os.path.join(REPO, "tools", "convert_hf.py")]
    cmds = [("import, TP = 1", tool + ["import", "--hf-path", hf, "--save", f"{out}/ckpt"])]
    if tp > 1:
        cmds.append((f"import, TP = {tp}", tool + ["import", "--hf-path", hf, "--save", f"{out}/ckpt_tp{tp}",
                                                    "--tensor-model-parallel-size", str(tp)]))
    ckpt = f"{out}/ckpt_tp{tp}" if tp > 1 else f"{out}/ckpt"
    cmds.append(("export, --max-shard-size 5GB", tool + ["export", "--load", ckpt, "--hf-path", f"{out}/hf_5GB"]))
    cmds.append((f"export, --max-shard-size {shard}", tool + ["export", "--load", ckpt, "--hf-path",
                                                              f"{out}/hf_{shard}", "--max-shard-size", shard]))
    return cmds


def measure(workdir: str, arch: Dict, dtype: str, tp: int, shard: str, tag: str) -> Dict:
    import torch

    from megatron_apex.conversion.random_weights import write_random_diffusers_folder

    root = os.path.join(workdir, tag)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    sizes = write_random_diffusers_folder(os.path.join(root, "hf"), "QwenImageTransformer2DModel", arch, seed=0,
                                          max_shard_size="1GB", dtype=getattr(torch, dtype))
    peaks = {name: _peak_rss(cmd) for name, cmd in _commands(os.path.join(root, "hf"), root, tp, shard)}
    for name in os.listdir(root):  # keep the disk use of several sizes bounded
        shutil.rmtree(os.path.join(root, name))
    return {**sizes, "peaks": peaks}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.workdir))):
        raise SystemExit(f"measure_conversion_memory.py: error: --workdir {a.workdir}: parent does not exist")
    os.makedirs(a.workdir, exist_ok=True)
    base = measure(a.workdir, TINY, a.dtype, a.tp, a.max_shard_size, "tiny")
    runs = []
    for layers in a.layers:
        arch = dict(num_layers=layers, num_attention_heads=a.heads, attention_head_dim=a.head_dim)
        runs.append((layers, measure(a.workdir, arch, a.dtype, a.tp, a.max_shard_size, f"layers{layers}")))

    gb = 1e9
    print(f"\nQwen-Image {a.heads} heads x {a.head_dim}, {a.dtype} weights; baseline = the same command on a "
          f"{base['bytes'] / 1e3:.0f} kB model")
    print("| layers | weights | largest tensor | command | peak RSS | baseline | peak - baseline | / weights "
          "| / largest tensor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layers, run in runs:
        for name, peak in run["peaks"].items():
            extra = peak - base["peaks"][name]
            print(f"| {layers} | {run['bytes'] / gb:.3f} GB | {run['largest'] / 1e6:.1f} MB | {name} | "
                  f"{peak / gb:.3f} GB | {base['peaks'][name] / gb:.3f} GB | {extra / gb:.3f} GB | "
                  f"{extra / run['bytes']:.3f} | {extra / run['largest']:.1f} |")
    print(json.dumps({"baseline": base, "runs": dict(runs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
