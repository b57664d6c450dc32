"""FID, Inception Score, k-NN precision/recall on plain numpy features (ADM protocol).

The formulas follow the OpenAI guided-diffusion evaluator ("ADM suite",
docs/evaluation.md §3) conceptually; the code is our own. Everything is float64:

- ``frechet_distance``: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) with scipy's
  ``sqrtm``. A product that is numerically singular (non-finite root) is retried with
  ``eps * I`` added to both covariances; a root whose diagonal has a large imaginary part is a
  numerical failure and raises instead of being patched. ``method="eigh"`` gives the same
  number for covariance inputs through symmetric eigendecompositions, much faster.
- ``inception_score``: exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits. The
  samples are shuffled first with a fixed seed (see the function for why and how).
- ``precision_recall``: k-NN manifolds (Kynkäänniemi et al. 2019) with k = 3; a point's
  radius is the distance to its k-th nearest neighbour in its own set, self excluded.
  Computed in (block x block) tiles so 50k x 10k features need bounded RAM. Distances are
  float64 here; the ADM code computes them in fp16 on the GPU first, so a point lying within
  fp16 rounding of a radius can flip (a ~1e-3 effect, well inside the ±0.01 run-to-run spread).
- Reference npz files (``VIRTUAL_imagenet256_labeled.npz``) hold ``mu``, ``sigma`` (pool_3),
  ``mu_s``, ``sigma_s`` (spatial, sFID) and ``arr_0`` (10k reference images, for P/R only).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)

# Where the ADM reference batches live (guided-diffusion's evaluations/README).
REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)
REFERENCE_ENV = "MVAR_REFERENCE_NPZ"

# torch-fidelity's default IS shuffle seed; using it keeps our IS equal to its own.
IS_SHUFFLE_SEED = 2020


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows are samples) in float64, as FID expects."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


FidMethod = Literal["sqrtm", "eigh"]


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    max_imag: float = 1e-3,
    method: FidMethod = "sqrtm",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``method="sqrtm"`` (default, the ADM evaluator's route): scipy's ``sqrtm(sigma1 @
    sigma2)``. ``eps`` is the diagonal offset tried when that root is not finite (singular
    product, e.g. fewer samples than dimensions); ``max_imag`` is the largest imaginary part
    tolerated on the root's diagonal before the result is declared a numerical failure (the
    ADM evaluator's 1e-3).

    ``method="eigh"``: tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})) — the same
    number for covariance (PSD) inputs, since S1 S2 and S1^{1/2} S2 S1^{1/2} share their
    eigenvalues, but through two symmetric eigendecompositions: ~15x faster at d = 2048
    (sqrtm takes ~45 s on 2 busy CPU cores) and free of spurious imaginary parts. Tiny
    negative eigenvalues from rounding are clipped to 0; clearly negative ones (a matrix that
    is not a covariance) raise.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and "
            f"{sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps, max_imag)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float, max_imag: float) -> float:
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning(
            "sqrtm(sigma1 @ sigma2) is not finite (singular product); retrying with %g * I "
            "added to both covariances",
            eps,
        )
        offset = eps * np.eye(s1.shape[0])
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > max_imag:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary diagonal component of {imag:.3g} "
                f"(> {max_imag:g}): the covariances are too ill-conditioned for a reliable FID"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_eigvalsh(m: np.ndarray, what: str, eigvecs: bool = False):  # type: ignore[no-untyped-def]
    sym = (m + m.T) / 2.0
    w, v = np.linalg.eigh(sym) if eigvecs else (np.linalg.eigvalsh(sym), None)
    # Rounding leaves eigenvalues of a PSD matrix at about -eps * largest; more is not a
    # covariance.
    tol = 1e-8 * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    if w.min(initial=0.0) < -tol:
        raise ValueError(f"{what} has a negative eigenvalue {w.min():.3g}: not a covariance matrix")
    return np.clip(w, 0.0, None), v


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    w1, v1 = _psd_eigvalsh(s1, "sigma1", eigvecs=True)
    root1 = (v1 * np.sqrt(w1)) @ v1.T
    w, _ = _psd_eigvalsh(root1 @ s2 @ root1, "sigma1^1/2 sigma2 sigma1^1/2")
    return float(np.sqrt(w).sum())


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def canonical_shuffle(rows: np.ndarray, seed: int = IS_SHUFFLE_SEED) -> np.ndarray:
    """Indices that put ``rows`` into a fixed pseudo-random order that depends only on the
    multiset of rows: rows are first sorted into a canonical order (by their bytes), then that
    order is permuted with ``np.random.RandomState(seed)``.

    Why both steps: IS is computed over splits, and a class-sorted sample file puts ~100
    classes in each split of 5,000, which drops IS from ~300 to ~60 (docs/evaluation.md §3.3). A plain
    seeded permutation of file order fixes that but leaves the result dependent on file order;
    the canonical sort makes it a function of the set of samples alone.
    """
    x = np.asarray(rows)
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D, got shape {x.shape}")
    # Canonical order = sort rows by their raw bytes (each row viewed as one opaque item):
    # any fixed total order works, and this one costs ~20 ms for 50k x 1008 where a numeric
    # lexsort over 1008 columns takes seconds. Equal rows tie, but they are interchangeable.
    x = np.ascontiguousarray(x)
    canonical = np.argsort(
        x.view(np.dtype((np.void, x.shape[1] * x.itemsize))).ravel(), kind="stable"
    )
    return canonical[np.random.RandomState(seed).permutation(x.shape[0])]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(
    logits: np.ndarray,
    splits: int = 10,
    shuffle: bool = True,
    shuffle_seed: int = IS_SHUFFLE_SEED,
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from the classifier's logits.

    ``logits`` are the 1008-way pool_3 x W logits without bias (torch-fidelity's
    ``logits_unbiased``, the ADM evaluator's softmax input); the softmax is taken here.
    Split i holds rows [i*N//splits, (i+1)*N//splits) — 10 splits of 5,000 for 50k samples.

    ``shuffle=True`` (default) orders the rows with :func:`canonical_shuffle` first, so the
    score is invariant to sample order and immune to class-sorted files; ``shuffle=False``
    uses file order exactly as given (the ADM evaluator's behaviour).
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be (N, num_classes), got shape {x.shape}")
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one sample per split: N={n}, splits={splits}")
    if shuffle:
        x = x[canonical_shuffle(x, shuffle_seed)]
    log_p = _log_softmax(x)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_i, log_p_i = p[lo:hi], log_p[lo:hi]
        log_marginal = np.log(p_i.mean(axis=0, keepdims=True))
        kl = (p_i * (log_p_i - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds)
# --------------------------------------------------------------------------------------------


def _sq_dists(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of two row blocks via |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    d = a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def _knn_sq_radii(x: np.ndarray, x_sq: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Squared distance of every row to its k-th nearest neighbour in ``x`` (self excluded).

    Self is at distance 0, so the k-th neighbour is the (k+1)-th smallest distance including
    self (index k after partitioning). Column blocks are merged by keeping the k+1 smallest
    values seen so far per row, so memory is block x (block + k + 1).
    """
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    out = np.empty(n)
    for r0, r1 in _blocks(n, block_size):
        best = np.full((r1 - r0, 0), np.inf)
        for c0, c1 in _blocks(n, block_size):
            d = _sq_dists(x[r0:r1], x[c0:c1], x_sq[r0:r1], x_sq[c0:c1])
            merged = np.concatenate([best, d], axis=1)
            keep = min(k + 1, merged.shape[1])
            best = np.partition(merged, keep - 1, axis=1)[:, :keep]
        out[r0:r1] = np.partition(best, k, axis=1)[:, k]
    return out


def knn_radii(features: np.ndarray, k: int = 3, block_size: int = 4096) -> np.ndarray:
    """Euclidean distance of each row to its k-th nearest neighbour in the same set."""
    x = np.asarray(features, dtype=np.float64)
    return np.sqrt(_knn_sq_radii(x, np.einsum("ij,ij->i", x, x), k, block_size))


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    block_size: int = 4096,
) -> tuple[float, float]:
    """k-NN precision and recall (ADM evaluator semantics, k = 3).

    precision = fraction of fake samples within some real sample's k-NN ball;
    recall    = fraction of real samples within some fake sample's k-NN ball;
    "within" is distance <= radius. Peak memory is a few block_size^2 float64 tiles
    (4096 -> ~130 MB each), independent of N.
    """
    real = np.asarray(real_features, dtype=np.float64)
    fake = np.asarray(fake_features, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got real {real.shape} and fake {fake.shape}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    real_sq = np.einsum("ij,ij->i", real, real)
    fake_sq = np.einsum("ij,ij->i", fake, fake)
    real_r2 = _knn_sq_radii(real, real_sq, k, block_size)
    fake_r2 = _knn_sq_radii(fake, fake_sq, k, block_size)

    fake_in_real = np.zeros(fake.shape[0], dtype=bool)
    real_in_fake = np.zeros(real.shape[0], dtype=bool)
    # One pass over the fake x real distance tiles answers both questions.
    for f0, f1 in _blocks(fake.shape[0], block_size):
        for r0, r1 in _blocks(real.shape[0], block_size):
            d = _sq_dists(fake[f0:f1], real[r0:r1], fake_sq[f0:f1], real_sq[r0:r1])
            fake_in_real[f0:f1] |= (d <= real_r2[None, r0:r1]).any(axis=1)
            real_in_fake[r0:r1] |= (d <= fake_r2[f0:f1, None]).any(axis=0)
    return float(fake_in_real.mean()), float(real_in_fake.mean())


# --------------------------------------------------------------------------------------------
# Files: checksums, reference npz
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (reference npz files are ~2 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def npz_keys(path: str | os.PathLike[str]) -> list[str]:
    """Array names in an npz without loading any array."""
    with zipfile.ZipFile(path) as zf:
        return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


@contextlib.contextmanager
def _npy_member(
    path: str | os.PathLike[str], key: str
) -> Iterator[tuple[IO[bytes], tuple[int, ...], bool, np.dtype]]:
    """Member ``key`` of an npz opened at its data: (file, shape, fortran_order, dtype)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(f)
        yield f, tuple(shape), fortran, dtype


def iter_npz_array(path: str | os.PathLike[str], key: str, batch: int) -> Iterator[np.ndarray]:
    """Yield ``key`` of an npz in row batches without loading the whole array (a 50k x 256 x
    256 x 3 sample file is 9.8 GB; ``np.load`` would read all of it at once)."""
    with _npy_member(path, key) as (f, shape, fortran, dtype):
        if fortran or dtype.hasobject:
            raise ValueError(
                f"{path}:{key} is Fortran-ordered or an object array; expected C order"
            )
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        for lo in range(0, shape[0], batch):
            rows = min(batch, shape[0] - lo)
            buf = f.read(rows * row_items * dtype.itemsize)
            yield np.frombuffer(buf, dtype=dtype).reshape((rows, *shape[1:]))


def npz_array_shape(path: str | os.PathLike[str], key: str) -> tuple[tuple[int, ...], np.dtype]:
    with _npy_member(path, key) as (_, shape, _, dtype):
        return shape, dtype


@dataclass
class Reference:
    """What a reference npz offers: precomputed pool_3 / spatial statistics and/or images."""

    path: Path
    sha256: str
    keys: list[str]
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    @property
    def has_images(self) -> bool:
        return "arr_0" in self.keys

    def images(self, batch: int) -> Iterator[np.ndarray]:
        return iter_npz_array(self.path, "arr_0", batch)


def missing_file_error(
    path: str | os.PathLike[str], what: str, looked: str, url: str
) -> FileNotFoundError:
    """A FileNotFoundError naming the file, where we looked and where to get it."""
    return FileNotFoundError(
        f"{what} not found: {os.fspath(path)!r} (looked in: {looked}). Download it from {url}"
    )


def load_reference(
    path: str | os.PathLike[str],
    require: tuple[str, ...] = (),
) -> Reference:
    """Open an ADM reference npz; statistics are loaded, images stay on disk.

    ``require`` lists keys that must be present (e.g. ``("mu", "sigma")``); a missing key
    raises a KeyError that names the file and the keys it does have.
    """
    p = Path(path)
    if not p.is_file():
        raise missing_file_error(
            p,
            "reference npz",
            f"{p.resolve().parent} (from --reference or ${REFERENCE_ENV})",
            REFERENCE_URL,
        )
    try:
        keys = npz_keys(p)
    except zipfile.BadZipFile as e:
        raise ValueError(f"reference {p} is not an npz (zip) file: {e}") from None
    missing = [k for k in require if k not in keys]
    if missing:
        raise KeyError(
            f"reference {p} lacks key(s) {missing}; it has {sorted(keys)}. An ADM reference "
            f"batch has mu, sigma, mu_s, sigma_s and arr_0 ({REFERENCE_URL})"
        )
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in keys) != (b in keys):
            raise KeyError(f"reference {p} has {a if a in keys else b!r} without its partner")
    ref = Reference(path=p, sha256=sha256_file(p), keys=keys)
    with np.load(p) as z:
        for k in ("mu", "sigma", "mu_s", "sigma_s"):
            if k in keys:
                setattr(ref, k, np.asarray(z[k], dtype=np.float64))
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        mu, sigma = getattr(ref, m), getattr(ref, s)
        if mu is not None and (mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2):
            raise ValueError(f"reference {p}: {s} {sigma.shape} does not match {m} {mu.shape}")
    return ref


def bootstrap_fid(
    features: np.ndarray,
    mu_ref: np.ndarray,
    sigma_ref: np.ndarray,
    reps: int = 200,
    seed: int = 0,
    level: float = 0.95,
    method: FidMethod = "sqrtm",
) -> tuple[float, float, float]:
    """FID of ``features`` against fixed reference statistics, and a bootstrap interval at
    ``level``: the sample set is resampled with replacement ``reps`` times (same size), the
    reference held fixed -- the interval is the spread due to which images a model happened to
    generate, the quantity that matters when two models are scored against the same reference.

    FID's estimator is biased upwards at finite N, and a resample with duplicated rows is
    biased more, so the plain percentile interval can lie entirely above the point estimate.
    The percentiles are therefore shifted by the bootstrap estimate of that extra bias
    (mean of the resamples minus the point estimate); the low end is clipped at 0.
    Returns (fid, low, high)."""
    x = np.asarray(features, dtype=np.float64)
    if reps < 2:
        raise ValueError(f"bootstrap needs reps >= 2, got {reps}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    fid = frechet_distance(*feature_statistics(x), mu_ref, sigma_ref, method=method)
    rng = np.random.default_rng(seed)
    boots = np.empty(reps)
    for r in range(reps):
        rows = rng.integers(0, x.shape[0], size=x.shape[0])
        boots[r] = frechet_distance(*feature_statistics(x[rows]), mu_ref, sigma_ref, method=method)
    lo, hi = np.quantile(boots - (boots.mean() - fid), [(1 - level) / 2, (1 + level) / 2])
    return float(fid), max(float(lo), 0.0), float(hi)
