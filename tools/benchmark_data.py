"""Loader throughput against the training step rate, on shards written by tools/prepare_data.py.

    python tools/benchmark_data.py                    # 2,000 Fashion-MNIST PNGs of 5 sizes, qwen-image-tiny
    python tools/benchmark_data.py --data-path data/mine --model sana-tiny

Without --data-path it writes --images Fashion-MNIST training images as PNGs of five sizes
(three aspect ratios) with class captions, and times tools/prepare_data.py's library on them
(`--vae none --channels 1 --resolution 28 --patch-size 4`, MiniLM captions). Then, on the
shards: the loader's start-up scan, the loader alone (bucketed sampler + get_batch of whole
global batches) and full Trainer iterations (flow matching, one process) take turns in
--rounds rounds, so a burst of other load hits both alike; rates are medians over the rounds.
Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(28, 28), (24, 32), (32, 24), (30, 30), (21, 28)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data-path", default=None, help="latent_shards.v1 folder (default: prepare Fashion-MNIST PNGs)")
    p.add_argument("--images", type=int, default=2000, help="PNGs to write and prepare without --data-path")
    p.add_argument("--workers", type=int, default=1, help="prepare_data worker processes")
    p.add_argument("--model", default="qwen-image-tiny", help="registry name of the trained model")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=5, help="training iterations (loader batches: 10x) per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed training iterations first (each new bucket shape costs extra the first time)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", default="runs/benchmark_data.md")
    a = p.parse_args(argv)
    for flag in ("images", "workers", "global_batch_size", "iters", "rounds", "threads", "warmup"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    return a


def write_pngs(folder: Path, n: int) -> None:
    from PIL import Image

    from megatron_apex.data.builtin import class_names, load_builtin_arrays

    images, labels = load_builtin_arrays("fashion-mnist", "train")
    names = class_names("fashion-mnist")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(images[i % len(images)]).resize((w, h)).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"a photo of a {names[labels[i % len(labels)]].lower()}")


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    work = tempfile.TemporaryDirectory(prefix="benchmark_data_")
    data_path = a.data_path
    if data_path is None:
        from megatron_apex.data.prepare import PrepareConfig, prepare

        write_pngs(Path(work.name) / "png", a.images)
        data_path = str(Path(work.name) / "shards")
        start = time.perf_counter()
        summary = prepare(PrepareConfig(inputs=[str(Path(work.name) / "png")], output=data_path, vae="none",
                                        channels=1, resolution=28, patch_size=4, max_text_len=16,
                                        samples_per_shard=500, workers=a.workers, progress=False))
        took = time.perf_counter() - start
        rows.append(("prepare_data (PNG decode, resize, MiniLM, write; incl. encoder load)",
                     f"{summary['samples'] / took:,.0f} samples/s ({summary['samples']} in {took:.1f} s, "
                     f"{a.workers} worker(s))"))

    from megatron_apex.data.latent_loader import LatentShardDataset
    from megatron_apex.training.arguments import parse_args as parse_run_args
    from megatron_apex.training.loop import Trainer

    start = time.perf_counter()
    dataset = LatentShardDataset(data_path, log=lambda m: None)
    took = time.perf_counter() - start
    rows.append(("loader start-up scan (index of every sample)", f"{len(dataset) / took:,.0f} samples/s "
                 f"({len(dataset)} in {took:.2f} s)"))

    gbs = a.global_batch_size
    trainer = Trainer(parse_run_args(["--model", a.model, "--data-path", data_path, "--objective", "fm",
                                      "--micro-batch-size", str(gbs), "--global-batch-size", str(gbs),
                                      "--train-iters", str(10 ** 9), "--no-progress"]))
    sampler = iter(dataset.batch_sampler(gbs, seed=1))

    def loader_round(n):
        begin = time.perf_counter()
        for _ in range(n):
            dataset.get_batch(next(sampler))
        return n * gbs / (time.perf_counter() - begin)

    def train_round(n):
        begin = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        return n / (time.perf_counter() - begin)

    train_round(a.warmup)
    loads, steps = [], []
    for r in range(a.rounds):
        loads.append(loader_round(10 * a.iters))
        steps.append(train_round(a.iters))
        print(f"[benchmark_data] round {r + 1}/{a.rounds}: loader {loads[-1]:,.0f} samples/s, "
              f"training {steps[-1]:.2f} it/s", flush=True)
    load, step = statistics.median(loads), statistics.median(steps)
    rows.append((f"loader: bucketed sampler + get_batch, global batch {gbs}", f"{load:,.0f} samples/s"))
    rows.append((f"{a.model} flow-matching iteration, global batch {gbs}, one process",
                 f"{step:.2f} it/s = {step * gbs:,.0f} samples/s"))
    rows.append(("loader time per training iteration", f"{100 * gbs / load * step:.2f}% "
                 f"(loader / training rate: {load / (step * gbs):,.0f}x)"))
    table = "| what | rate |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
