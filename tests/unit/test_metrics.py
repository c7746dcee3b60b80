"""Frechet distance, accuracy, diversity, the classifier and the evaluation tool."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from megatron_apex.data.builtin import load_builtin_arrays
from megatron_apex.eval import classifier as clf
from megatron_apex.eval.metrics import evaluate_images, to_grey_uint8
from megatron_apex.eval.scores import class_accuracy, diversity, frechet_distance, frechet_distance_from_stats

ROOT = Path(__file__).resolve().parents[2]


def scipy_fd(a, b):
    """The usual pytorch-fid route: scipy sqrtm of S1 S2, real part."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16))
    a = rng.standard_normal((2000, 16)) @ mix
    b = rng.standard_normal((1500, 16)) @ (mix + 0.3 * rng.standard_normal((16, 16))) + 0.5
    return a, b


def test_fd_of_a_set_with_itself_is_zero(feats):
    a, _ = feats
    assert frechet_distance(a, a) < 1e-8 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(a).float()) < 1e-3


def test_fd_grows_with_noise(feats):
    a, _ = feats
    noise = np.random.default_rng(1).standard_normal(a.shape)
    fds = [frechet_distance(a, a + s * noise) for s in (0.0, 0.3, 1.0, 3.0, 10.0)]
    assert all(x < y for x, y in zip(fds, fds[1:])), fds


def test_fd_matches_scipy_and_closed_form(feats):
    a, b = feats
    ours, ref = frechet_distance(a, b), scipy_fd(a, b)
    assert abs(ours - ref) < 1e-6 * ref
    # diagonal Gaussians: sum (sqrt(v1) - sqrt(v2))^2 + ||mu1 - mu2||^2
    rng = np.random.default_rng(2)
    v1, v2, m1, m2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8), rng.normal(size=8), rng.normal(size=8)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert abs(frechet_distance_from_stats(m1, np.diag(v1), m2, np.diag(v2)) - closed) < 1e-10


def test_fd_with_singular_covariance(feats):
    """Class-mean style input (10 distinct rows repeated): rank-9 covariance."""
    a, b = feats
    reps = np.repeat(b[:10], 50, axis=0)
    s1, s2 = np.cov(reps, rowvar=False), np.cov(a, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()  # eig of a product
    ref = ((reps.mean(0) - a.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert abs(frechet_distance(reps, a) - ref) < 1e-6 * ref


def test_class_accuracy_and_diversity_match_loops():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((200, 10))
    labels = rng.integers(0, 10, 200)
    loop_acc = sum(int(np.argmax(row) == y) for row, y in zip(logits, labels)) / 200
    assert class_accuracy(logits, labels) == pytest.approx(loop_acc)
    assert class_accuracy(torch.from_numpy(logits.argmax(1)), labels) == pytest.approx(loop_acc)

    f = rng.standard_normal((60, 5))
    y = rng.integers(0, 4, 60)
    y[0] = 7  # a class with a single sample does not count
    per_class = []
    for c in set(y.tolist()):
        rows = f[y == c]
        d = [np.linalg.norm(rows[i] - rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
        if d:
            per_class.append(np.mean(d))
    assert diversity(f, y) == pytest.approx(np.mean(per_class), rel=1e-10)


def test_grey_conversion():
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(to_grey_uint8(np.repeat(x[..., None], 3, -1)), x)
    np.testing.assert_array_equal(to_grey_uint8(x[..., None]), x)
    with pytest.raises(ValueError, match="uint8"):
        to_grey_uint8(x.astype(np.float32))


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model = clf.load_or_train_classifier("digits", cache_dir=cache, epochs=15, verbose=False)
    return model, cache


def test_classifier_accuracy_and_cache(digits_classifier, monkeypatch):
    model, cache = digits_classifier
    x, y = load_builtin_arrays("digits", "test")
    preds = clf.logits(model, x).argmax(1).numpy()
    assert model.test_accuracy == pytest.approx(float(np.mean(preds == y)))
    assert model.test_accuracy > 0.8  # 10 classes: chance is 0.1
    f = clf.features(model, x)
    assert f.shape == (len(x), clf.FEATURE_DIM)
    torch.testing.assert_close(model.head(f), clf.logits(model, x))

    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    again = clf.load_or_train_classifier("digits", cache_dir=cache, epochs=15)
    torch.testing.assert_close(clf.features(again, x), f)
    assert not [p for p in (cache / "classifiers").iterdir() if ".tmp" in p.name]


def test_evaluate_images_scale_references(digits_classifier):
    model, cache = digits_classifier
    tr_x, tr_y = load_builtin_arrays("digits", "train")
    idx = np.arange(250)
    real = evaluate_images(tr_x[idx], tr_y[idx], "digits", classifier=model)
    means = np.stack([tr_x[tr_y == c].mean(0) for c in range(10)]).round().astype(np.uint8)
    collapsed = evaluate_images(means[tr_y[idx]][..., None], tr_y[idx], "digits", classifier=model)
    # the class-mean generator IS the fd_class_means reference (up to float32 batching noise)
    assert collapsed["fd"] == pytest.approx(collapsed["fd_class_means"], rel=1e-5)
    assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert real["fd_class_means"] == collapsed["fd_class_means"] and real["fd_real"] == collapsed["fd_real"]
    assert real["diversity"] > 0.5 * real["diversity_real"]
    # the held-out half of the test split (protocol: seed-0 permutation, first num_real = R)
    # passed in as "generated" is exactly the label-matched comparison set B
    te_x, te_y = load_builtin_arrays("digits", "test")
    rest = np.random.default_rng(0).permutation(len(te_y))[300:]
    held = evaluate_images(te_x[rest], te_y[rest], "digits", classifier=model, num_real=300)
    assert held["num_real_b"] == len(rest)
    assert held["fd"] == pytest.approx(held["fd_real"], rel=1e-5)
    assert held["diversity"] == pytest.approx(held["diversity_real"], rel=1e-5)
    assert held["fd"] < 0.5 * held["fd_class_means"]
    # degrading those real images moves them away from the reference, step by step
    noise = np.random.default_rng(1).normal(size=te_x[rest].shape)
    fds = [evaluate_images(np.clip(te_x[rest] + s * noise, 0, 255).astype(np.uint8), te_y[rest], "digits",
                           classifier=model)["fd"] for s in (20, 60, 120)]
    assert held["fd"] < fds[0] < fds[1] < fds[2], fds
    assert real["acc"] == pytest.approx(class_accuracy(clf.logits(model, tr_x[idx]), tr_y[idx]))
    assert real["num_real"] == 300 and real["num_real_b"] <= 250
    with pytest.raises(ValueError, match="images are 8x8"):
        evaluate_images(np.zeros((4, 8, 8), np.uint8), np.zeros(4, int), "digits", classifier=model)


def _load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_tool(tmp_path, digits_classifier):
    tool = _load_tool()
    tr_x, tr_y = load_builtin_arrays("digits", "train")
    # (bad --samples files and their one-line errors: tests/unit/test_bad_inputs.py, eval-* rows)
    model, fixture_cache = digits_classifier
    # reuse the fixture's classifier as the tool's default one (training that takes longer)
    target = clf.classifier_cache_path("digits", tmp_path / "cache")
    target.parent.mkdir(parents=True)
    shutil.copy(clf.classifier_cache_path("digits", fixture_cache, epochs=15), target)
    np.savez(tmp_path / "s.npz", images=tr_x[:40, ..., None], labels=tr_y[:40])
    out = tool.main(["--samples", str(tmp_path / "s.npz"), "--dataset", "digits",
                     "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")])
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["fd"] == out["fd"] and written["samples"] == str(tmp_path / "s.npz")
    direct = evaluate_images(tr_x[:40], tr_y[:40], "digits", classifier=model)
    for k in ("acc", "fd", "diversity", "fd_real", "fd_class_means"):
        assert written[k] == pytest.approx(direct[k], rel=1e-9)
