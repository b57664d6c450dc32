"""mvar.metrics: closed forms, brute-force oracles and torch-fidelity's own functions."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax, softmax
from scipy.stats import ortho_group

from mvar import metrics
from mvar.metrics import (
    REFERENCE_URL,
    canonical_shuffle,
    feature_statistics,
    frechet_distance,
    inception_score,
    iter_npz_array,
    knn_radii,
    load_reference,
    precision_recall,
    sha256_file,
)

# --- Fréchet distance -----------------------------------------------------------------------


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_frechet_commuting_covariances_closed_form() -> None:
    # S_i = Q diag(a_i) Q^T share eigenvectors, so (S1 S2)^{1/2} = Q diag(sqrt(a1 a2)) Q^T.
    rng = np.random.default_rng(1)
    d = 24
    q = ortho_group.rvs(d, random_state=2)
    a, b = rng.uniform(0.05, 4.0, d), rng.uniform(0.05, 4.0, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-9)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_singular_covariance_is_finite() -> None:
    # Fewer samples than dimensions: rank-deficient covariances, as with a small sample set.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.5
    (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
    assert np.isfinite(frechet_distance(m1, s1, m2, s2))


def test_frechet_raises_on_large_imaginary_component() -> None:
    # A "covariance" with a negative eigenvalue: the square root is genuinely complex and must
    # be reported, not silently replaced by its real part.
    s1 = np.diag([1.0, -4.0])
    s2 = np.eye(2)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), s1, np.zeros(2), s2)


@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_eigh_method_equals_sqrtm(rank: int | None) -> None:
    rng = np.random.default_rng(16)
    n = 300 if rank is None else rank + 1  # rank-deficient: fewer samples than dimensions
    x, y = rng.normal(size=(n, 48)), rng.normal(size=(n, 48)) * 1.5 + 0.1
    stats = (*feature_statistics(x), *feature_statistics(y))
    want = frechet_distance(*stats, method="sqrtm")
    assert frechet_distance(*stats, method="eigh") == pytest.approx(want, rel=1e-7)
    with pytest.raises(ValueError, match="not a covariance"):
        frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2), method="eigh")
    with pytest.raises(ValueError, match="method must be"):
        frechet_distance(*stats, method="svd")  # type: ignore[arg-type]


def test_frechet_shape_errors() -> None:
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


def test_feature_statistics() -> None:
    x = np.random.default_rng(4).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def test_frechet_equals_torch_fidelity() -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 64))
    y = rng.normal(size=(300, 64)) * 1.3 + 0.2
    ours = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    sx = fid_features_to_statistics(torch.from_numpy(x))
    sy = fid_features_to_statistics(torch.from_numpy(y))
    theirs = fid_statistics_to_metric(sx, sy, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-8)


# --- Inception Score ------------------------------------------------------------------------


def _is_direct(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """IS as exp(H(mean p) - mean H(p)) per split: an algebraically different route."""
    n = len(logits)
    scores = []
    for i in range(splits):
        part = logits[i * n // splits : (i + 1) * n // splits]
        p = softmax(part, axis=1)
        h_cond = -(p * log_softmax(part, axis=1)).sum(1).mean()
        pbar = p.mean(0)
        h_marg = -(pbar * np.log(pbar)).sum()
        scores.append(np.exp(h_marg - h_cond))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_equals_direct_numpy() -> None:
    logits = np.random.default_rng(6).normal(size=(1003, 50)) * 3
    for splits in (1, 4, 10):
        got = inception_score(logits, splits=splits, shuffle=False)
        want = _is_direct(logits, splits)
        assert got == pytest.approx(want, rel=1e-10)


def test_inception_score_extremes() -> None:
    # One-hot predictions uniform over C classes in every split -> IS = C; constant -> 1.
    c = 8
    logits = np.full((c * 10, c), -50.0)
    logits[np.arange(c * 10), np.arange(c * 10) % c] = 50.0
    assert inception_score(logits, splits=10, shuffle=False)[0] == pytest.approx(c, rel=1e-6)
    assert inception_score(np.zeros((40, c)), splits=4)[0] == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 120), c=st.integers(2, 30), seed=st.integers(0, 2**31 - 1))
def test_inception_score_order_invariant_when_shuffling(n: int, c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 4
    perm = rng.permutation(n)
    assert inception_score(logits[perm], splits=5) == inception_score(logits, splits=5)


def test_class_sorted_file_trap() -> None:
    # A class-sorted file: each split of file order holds one class only, so IS in file order
    # collapses to ~1 while the shuffled IS sees all classes (the 300 -> 60 trap, docs/evaluation.md §3.3).
    c, per = 10, 40
    logits = np.full((c * per, c), -20.0)
    logits[np.arange(c * per), np.repeat(np.arange(c), per)] = 20.0
    file_order = inception_score(logits, splits=10, shuffle=False)[0]
    shuffled = inception_score(logits, splits=10)[0]
    assert file_order == pytest.approx(1.0, abs=1e-6)
    assert shuffled > 0.8 * c


def test_inception_score_equals_torch_fidelity() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(7).normal(size=(500, 1008)) * 2
    t = torch.from_numpy(logits)
    theirs = isc_features_to_metric(t, splits=10, shuffle=False)
    ours = inception_score(logits, splits=10, shuffle=False)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-8)
    # With shuffling: torch-fidelity on our (documented) order gives our number.
    order = canonical_shuffle(logits)
    theirs = isc_features_to_metric(t[order], splits=10, shuffle=False)
    assert inception_score(logits)[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-10)


def test_canonical_shuffle_is_a_permutation_and_seeded() -> None:
    x = np.random.default_rng(8).normal(size=(100, 5))
    o = canonical_shuffle(x, seed=1)
    assert sorted(o.tolist()) == list(range(100))
    assert not np.array_equal(o, canonical_shuffle(x, seed=2))
    with pytest.raises(ValueError, match="at least one sample per split"):
        inception_score(x[:3], splits=10)


# --- precision / recall ---------------------------------------------------------------------


def _pr_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(a):
        d = np.sort(dists(a, a), axis=1)
        return d[:, k]  # d[:, 0] is the point itself

    r_real, r_fake = radii(real), radii(fake)
    d = dists(fake, real)
    precision = np.mean([(d[i] <= r_real).any() for i in range(len(fake))])
    recall = np.mean([(d[:, j] <= r_fake).any() for j in range(len(real))])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("block", [7, 64, 4096])
def test_precision_recall_equals_brute_force(k: int, block: int) -> None:
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(90, 16))
    fake = rng.normal(size=(130, 16)) * 0.8 + 0.6  # partly overlapping manifolds
    got = precision_recall(real, fake, k=k, block_size=block)
    want = _pr_brute_force(real, fake, k)
    assert got == want
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # a non-degenerate case


def test_knn_radii_excludes_self() -> None:
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(knn_radii(x, k=2, block_size=3), [3.0, 2.0, 3.0, 6.0])
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(x, k=4)


@pytest.mark.parametrize("save_cpu_ram", [False, True])
def test_precision_recall_equals_torch_fidelity(save_cpu_ram: bool) -> None:
    from torch_fidelity.metric_prc import (
        calculate_precision_recall_full,
        calculate_precision_recall_part,
    )

    rng = np.random.default_rng(11)
    real = rng.normal(size=(300, 32))
    fake = rng.normal(size=(250, 32)) * 0.9 + 0.2
    fn = calculate_precision_recall_part if save_cpu_ram else calculate_precision_recall_full
    # torch-fidelity's convention: features_1 = generated, features_2 = real.
    theirs = fn(torch.from_numpy(fake), torch.from_numpy(real), 3, 100)
    # Theirs are float32 means of 0/1 flags; 1e-6 is far below one sample (1/300).
    assert precision_recall(real, fake, k=3, block_size=64) == pytest.approx(theirs, abs=1e-6)


def test_precision_recall_memory_is_bounded_by_blocks() -> None:
    # The 2000 x 2000 float64 self-distance matrix alone would be 32 MB; with 128-row tiles
    # the peak must stay a small multiple of one 128 x 128 tile, whatever N is.
    rng = np.random.default_rng(12)
    real, fake = rng.normal(size=(500, 16)), rng.normal(size=(2000, 16))
    tracemalloc.start()
    try:
        precision_recall(real, fake, k=3, block_size=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4e6, f"peak {peak / 1e6:.1f} MB"


# --- files ----------------------------------------------------------------------------------


def test_sha256_file(tmp_path) -> None:
    p = tmp_path / "x.bin"
    data = np.random.default_rng(13).bytes(5_000_000)
    p.write_bytes(data)
    assert sha256_file(p, chunk_bytes=1 << 16) == hashlib.sha256(data).hexdigest()


def test_iter_npz_array_streams_rows(tmp_path) -> None:
    arr = np.random.default_rng(14).integers(0, 255, size=(11, 4, 5, 3), dtype=np.uint8)
    p = tmp_path / "a.npz"
    np.savez(p, arr_0=arr, other=np.zeros(2))
    for batch in (1, 4, 11, 50):
        got = np.concatenate(list(iter_npz_array(p, "arr_0", batch)))
        np.testing.assert_array_equal(got, arr)


def test_load_reference(tmp_path) -> None:
    rng = np.random.default_rng(15)
    p = tmp_path / "ref.npz"
    mu, sigma = rng.normal(size=8), np.eye(8)
    imgs = rng.integers(0, 255, size=(3, 4, 4, 3), dtype=np.uint8)
    np.savez(p, mu=mu, sigma=sigma, mu_s=mu[:4], sigma_s=np.eye(4), arr_0=imgs)
    ref = load_reference(p, require=("mu", "sigma", "arr_0"))
    np.testing.assert_array_equal(ref.mu, mu)
    assert ref.sigma_s.shape == (4, 4) and ref.has_images
    assert ref.sha256 == sha256_file(p)
    np.testing.assert_array_equal(np.concatenate(list(ref.images(2))), imgs)


def test_reference_errors_name_file_and_source(tmp_path) -> None:
    missing = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(FileNotFoundError) as e:
        load_reference(missing)
    msg = str(e.value)
    assert "VIRTUAL_imagenet256_labeled.npz" in msg and str(tmp_path) in msg
    assert REFERENCE_URL in msg

    p = tmp_path / "stats_only.npz"
    np.savez(p, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(KeyError, match=r"lacks key\(s\) \['arr_0'\]"):
        load_reference(p, require=("mu", "sigma", "arr_0"))
    q = tmp_path / "half.npz"
    np.savez(q, mu=np.zeros(3))
    with pytest.raises(KeyError, match="without its partner"):
        load_reference(q)
    r = tmp_path / "not_npz.npz"
    r.write_text("hello")
    with pytest.raises(ValueError, match="not an npz"):
        load_reference(r)


def test_module_has_no_print() -> None:
    import inspect

    assert "print(" not in inspect.getsource(metrics)
