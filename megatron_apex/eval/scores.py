"""The scores of generated images, on classifier features: Frechet distance, class accuracy,
diversity. Pure functions of arrays; the benchmark protocol that feeds them is
megatron_apex/eval/metrics.py."""

from __future__ import annotations

import numpy as np
import torch


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)): the inner matrix is symmetric PSD, so
    symmetric eigen-solvers stay exact even when S1 or S2 is singular (e.g. class means),
    where a general matrix square root of S1 S2 goes complex or unstable.
    """
    mu1, mu2, s1, s2 = (_as_f64(a) for a in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """FD between the Gaussians fitted (mean, unbiased covariance) to two (N, F) feature sets."""
    a, b = _as_f64(feats_a), _as_f64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, F) with the same F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False),
                                       b.mean(0), np.cov(b, rowvar=False))


def class_accuracy(logits_or_preds, labels) -> float:
    """Fraction of argmax(logits) (or integer predictions) equal to labels."""
    p = logits_or_preds if isinstance(logits_or_preds, torch.Tensor) else torch.from_numpy(np.array(logits_or_preds))
    y = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.array(labels))
    y = y.long().reshape(-1)
    if p.ndim == 2:
        p = p.argmax(-1)
    if p.shape != y.shape:
        raise ValueError(f"{tuple(p.shape)} predictions for {tuple(y.shape)} labels")
    return float((p.long() == y).float().mean())


def diversity(feats, labels) -> float:
    """Mean pairwise Euclidean feature distance within each class, averaged over classes
    that have at least 2 samples."""
    f = torch.as_tensor(_as_f64(feats))
    y = np.asarray(labels).reshape(-1)
    if len(f) != len(y):
        raise ValueError(f"{len(f)} feature rows for {len(y)} labels")
    per_class = []
    for c in np.unique(y):
        fc = f[torch.as_tensor(y == c)]
        if len(fc) >= 2:
            per_class.append(float(torch.pdist(fc).mean()))
    if not per_class:
        raise ValueError("diversity needs a class with at least 2 samples")
    return float(np.mean(per_class))
