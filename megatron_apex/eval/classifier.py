"""A small CNN trained on the REAL training images: the judge of generated samples.

Its 64-d penultimate layer (before the ReLU, so the features are not half zeros) is the
feature space of the Frechet distance and the diversity score; its argmax is the class
accuracy. 64 dimensions keep the covariance well estimated from ~1000 samples.
The trained weights are cached per (dataset, architecture version, training settings).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_apex.data.builtin import default_cache_dir, load_builtin_arrays, resolve_builtin_name
from megatron_apex.eval.scores import class_accuracy

ARCH_VERSION = 2
FEATURE_DIM = 64
# Fashion-MNIST: 4 epochs (1876 steps of 128, ~30 s on one core) reach 0.908 test accuracy
# (2 epochs: 0.895). Digits (1.2k images) need more passes: 30 epochs (290 steps) reach 0.987.
DEFAULT_EPOCHS = {"fashion-mnist": 4, "digits": 30}


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, image_size: int = 28, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.image_size = image_size
        # Strided convolutions instead of conv+pool: ~6x fewer FLOPs, so training fits in
        # about a minute on 2 busy CPU cores.
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        side = (image_size + 3) // 4
        self.fc = nn.Linear(32 * side * side, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))
        self.test_accuracy: float | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run small-kernel work on few threads: with other jobs on the same cores, 2 OpenMP
    threads made this training 13x slower than 1 (65 s vs 5 s measured on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_input(images) -> torch.Tensor:
    """float (N, 1, H, W) in [-1, 1]; uint8 arrays (N, H, W) are converted."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x.float()


@torch.no_grad()
def _batched(model: SmallCNN, images, fn, batch_size: int = 1000, threads: int = 1) -> torch.Tensor:
    model.eval()
    x = _as_input(images)
    with _torch_threads(threads):
        return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def features(model: SmallCNN, images, batch_size: int = 1000) -> torch.Tensor:
    """(N, F) penultimate-layer features of float [-1, 1] (N, 1, H, W) or uint8 (N, H, W) images."""
    return _batched(model, images, model.features, batch_size)


def logits(model: SmallCNN, images, batch_size: int = 1000) -> torch.Tensor:
    return _batched(model, images, model, batch_size)


def train_classifier(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                     test_labels: np.ndarray, epochs: int = 2, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, verbose: bool = True, threads: int = 1) -> SmallCNN:
    """Adam on float [-1, 1] images; returns the model in eval mode with `test_accuracy` set."""
    with _torch_threads(threads):
        return _train(images, labels, test_images, test_labels, epochs, batch_size, lr, seed, verbose)


def _train(images, labels, test_images, test_labels, epochs, batch_size, lr, seed, verbose) -> SmallCNN:
    torch.manual_seed(seed)
    x = _as_input(images)
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    model = SmallCNN(num_classes=int(y.max()) + 1, image_size=x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if verbose and (step % 100 == 0 or step == epochs * steps_per_epoch):
                print(f"[classifier] epoch {epoch + 1}/{epochs} step {step}/{epochs * steps_per_epoch} "
                      f"loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    model.eval()
    model.test_accuracy = class_accuracy(logits(model, test_images), test_labels)
    model.train_seconds = time.perf_counter() - t0
    if verbose:
        print(f"[classifier] trained in {model.train_seconds:.1f}s, test accuracy "
              f"{model.test_accuracy:.4f} on {len(test_labels)} images", file=sys.stderr)
    return model


def classifier_cache_path(dataset_name: str, cache_dir=None, epochs: int | None = None, seed: int = 0,
                          train_subset: int | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    epochs = epochs or DEFAULT_EPOCHS[dataset_name]
    sub = f"-n{train_subset}" if train_subset else ""
    return root / "classifiers" / f"{dataset_name}-cnn{ARCH_VERSION}-e{epochs}-s{seed}{sub}.pt"


def load_or_train_classifier(dataset_name: str | None = None, cache_dir=None, epochs: int | None = None,
                             seed: int = 0, train_subset: int | None = None,
                             verbose: bool = True) -> SmallCNN:
    """The cached classifier of a built-in dataset, trained (and cached atomically) on first use.

    `train_subset` trains on the first n training images only (for fast tests).
    """
    dataset_name = resolve_builtin_name(dataset_name)
    epochs = epochs or DEFAULT_EPOCHS[dataset_name]
    path = classifier_cache_path(dataset_name, cache_dir, epochs, seed, train_subset)
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            model = SmallCNN(num_classes=blob["num_classes"], image_size=blob["image_size"])
            model.load_state_dict(blob["state_dict"])
            model.test_accuracy = blob["test_accuracy"]
            model.train_seconds = blob["train_seconds"]
            return model.eval()
        except Exception as exc:
            print(f"[classifier] ignoring unreadable cache {path}: {exc}", file=sys.stderr)
    images, labels = load_builtin_arrays(dataset_name, "train")
    if train_subset:
        images, labels = images[:train_subset], labels[:train_subset]
    test_images, test_labels = load_builtin_arrays(dataset_name, "test")
    if verbose:
        print(f"[classifier] training on {len(labels)} real {dataset_name} images "
              f"({epochs} epochs, seed {seed})", file=sys.stderr)
    model = train_classifier(images, labels, test_images, test_labels, epochs=epochs, seed=seed,
                             verbose=verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(dict(state_dict=model.state_dict(), num_classes=model.head[-1].out_features,
                    image_size=model.image_size, test_accuracy=model.test_accuracy,
                    train_seconds=model.train_seconds, dataset=dataset_name), tmp)
    os.replace(tmp, path)
    return model
