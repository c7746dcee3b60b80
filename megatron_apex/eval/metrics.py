"""The small-scale benchmark's scoring of generated images: class accuracy, Frechet distance,
diversity (computed by megatron_apex/eval/scores.py) under one fixed protocol.

Protocol of `evaluate_images` (N generated images with their conditioning labels):
- Feature space: the 64-d penultimate layer of the dataset's cached classifier
  (`eval/classifier.py`, trained on the real TRAIN split only).
- The held-out TEST split (Fashion-MNIST: 10,000 images; digits: 600) is permuted with a
  fixed seed (0) and cut into two disjoint parts:
  * reference set R = the first `num_real` images (default: half the split, 5,000 / 300);
  * comparison set B = from the rest, for each class c the first n_c images of class c,
    n_c = how many generated images carry label c (capped by what is left of that class).
- `fd`: FD(generated, R). `acc`: classifier argmax == conditioning label.
  `diversity`: mean pairwise feature distance within each class, averaged over classes.
- Scale references, computed exactly the same way:
  * `fd_real` = FD(B, R): what a perfect generator with these label counts would score
    (nonzero only by sampling noise); `diversity_real` = diversity of B.
  * `fd_class_means` = FD(class-mean images, R), the per-class mean of the TRAIN images
    (quantised to uint8), each repeated n_c times: what a generator that collapses every
    prompt to its conditional mean scores.
FD numbers depend on N (small-sample bias), so compare runs with the same N.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_apex.data.builtin import load_builtin_arrays, resolve_builtin_name
from megatron_apex.eval.classifier import features, load_or_train_classifier, logits
from megatron_apex.eval.scores import class_accuracy, diversity, frechet_distance


def _diversity_or_nan(feats, labels) -> float:
    try:
        return diversity(feats, labels)
    except ValueError:  # e.g. one image per class: undefined, not an input error
        return float("nan")


def to_grey_uint8(images) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) with C in {1, 3} -> uint8 (N, H, W)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W[, C]), got dtype {x.dtype}")
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x[..., 0] if x.shape[-1] == 1 else np.round(x.astype(np.float32).mean(-1)).astype(np.uint8)
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C) with C in 1/3, got {x.shape}")
    return x


def _matched_subset(pool: np.ndarray, pool_labels: np.ndarray, counts: dict[int, int]) -> np.ndarray:
    picked = [pool[pool_labels[pool] == c][:n] for c, n in sorted(counts.items())]
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def evaluate_images(images, labels, dataset_name: str | None = None, num_real: int | None = None,
                    classifier=None, cache_dir=None, seed: int = 0) -> dict:
    """Score generated uint8 images against the real test split (see the module docstring)."""
    dataset_name = resolve_builtin_name(dataset_name)
    gen = to_grey_uint8(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(gen):
        raise ValueError(f"{len(gen)} images but {len(labels)} labels")
    model = classifier if classifier is not None else load_or_train_classifier(dataset_name, cache_dir)
    test_x, test_y = load_builtin_arrays(dataset_name, "test")
    train_x, train_y = load_builtin_arrays(dataset_name, "train")
    if gen.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"images are {gen.shape[1]}x{gen.shape[2]}, {dataset_name} images are "
                         f"{test_x.shape[1]}x{test_x.shape[2]}")
    num_classes = len(np.unique(train_y))
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    num_real = len(test_y) // 2 if num_real is None else int(num_real)
    if not 2 <= num_real < len(test_y):
        raise ValueError(f"num_real must be in [2, {len(test_y)}) for the {dataset_name} test split")

    perm = np.random.default_rng(seed).permutation(len(test_y))
    ref_idx = perm[:num_real]
    counts = {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    b_idx = _matched_subset(perm[num_real:], test_y, counts)

    means = np.stack([train_x[train_y == c].astype(np.float64).mean(0) for c in range(num_classes)])
    means = np.round(means).clip(0, 255).astype(np.uint8)

    f_gen = features(model, gen)
    f_ref = features(model, test_x[ref_idx])
    f_b = features(model, test_x[b_idx])
    f_means = features(model, means)[torch.as_tensor(labels)]
    return dict(
        acc=class_accuracy(logits(model, gen), labels),
        fd=frechet_distance(f_gen, f_ref),
        diversity=_diversity_or_nan(f_gen, labels),
        fd_class_means=frechet_distance(f_means, f_ref),
        fd_real=frechet_distance(f_b, f_ref),
        diversity_real=_diversity_or_nan(f_b, test_y[b_idx]),
        num_generated=int(len(gen)), num_real=int(num_real), num_real_b=int(len(b_idx)),
        classifier_test_acc=float(model.test_accuracy) if model.test_accuracy is not None else None,
        dataset=dataset_name, feature_dim=int(f_gen.shape[1]),
    )
