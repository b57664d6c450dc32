"""Score a sample set against a reference: FID, sFID, IS, precision/recall.

    python -m mvar.evaluate --samples <folder|npz> --reference <ADM npz|folder|npz> \\
        [--inception-weights PATH] [--out results.json] [--csv outputs/eval_results.csv]

``--samples``: a PNG folder written by ``mvar.generate`` (or any folder of ``NNNNNN.png``)
or an npz with ``arr_0`` uint8 (N, H, W, 3).

``--reference``:

- an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): FID against its precomputed
  ``mu``/``sigma`` (ImageNet-train statistics, not its 10k images), sFID against its
  ``mu_s``/``sigma_s``, precision/recall against the features of its 10k images ``arr_0``
  (docs/evaluation.md §2);
- or another image set (folder or npz with only ``arr_0``): FID and sFID between the two sets'
  statistics, precision/recall against its images. A reference npz without ``mu_s``/``sigma_s``
  gets its sFID statistics from its images.

sFID (docs/evaluation.md §3.5) is the Fréchet distance on the ADM evaluator's spatial feature,
read by a hook during the same Inception forward as pool_3 and the logits; the result names the
(partly inferred) mapping it follows (``sfid_feature``, ``mvar.inception.SFID_FEATURE``).
IS needs no reference (10 splits after a fixed-seed canonical shuffle, ``mvar.metrics``).

Output: a JSON with every number, its status, and the provenance (N, reference sha256,
Inception weights path + sha256 + whether it matches the official prefix, extractor name,
device, torch version, git SHA, the samples' ``settings.json``), plus one appended CSV row.
Features can be cached (``--cache-dir``) so that a re-run after an interruption, or a second
evaluation against the same reference, skips the extraction.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvar.generate import list_pngs, png_name
from mvar.inception import (
    SFID_DIM,
    SFID_FEATURE,
    FeatureCacheError,
    Features,
    InceptionExtractor,
)
from mvar.io import atomic_write, atomic_write_json, check_output_file
from mvar.metrics import (
    IS_SHUFFLE_SEED,
    REFERENCE_ENV,
    REFERENCE_URL,
    FidMethod,
    feature_statistics,
    frechet_distance,
    inception_score,
    iter_npz_array,
    load_reference,
    missing_file_error,
    npz_array_shape,
    npz_keys,
    precision_recall,
    sha256_file,
)

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = (
    "timestamp", "samples", "reference", "num_samples", "fid", "is_mean", "is_std",
    "precision", "recall", "sfid", "fid_status", "is_status", "pr_status", "sfid_status",
    "sfid_feature",
    "reference_sha256", "inception_weights_sha256", "extractor", "device", "torch", "git_sha",
    "na_backend", "sample_dtype", "sample_device", "checkpoint_sha256", "vae_sha256",
    "samples_content_key",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Image sources: a PNG folder or an npz
# --------------------------------------------------------------------------------------------


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Bumped when the feature extraction changes what it computes (invalidates feature caches).
# v3: the sFID feature is stored next to pool_3 and the logits.
CACHE_VERSION = "features-v3"


def _png_files(folder: Path) -> list[Path]:
    """A sample folder's NNNNNN.png in index order, else every image file sorted by name.

    A numbered folder must be complete: indices 0..N-1 with no gap, and N equal to
    ``num_images`` of its settings.json when it has one (an interrupted generation is never
    scored as if it were the whole set)."""
    files = list_pngs(folder)
    if files:
        settings = folder / "settings.json"
        expected = None
        if settings.is_file():
            try:
                expected = int(json.loads(settings.read_text())["num_images"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{settings} is unreadable or lacks num_images ({e})") from None
        n = expected if expected is not None else len(files)
        names = {p.name for p in files}
        missing = [png_name(i) for i in range(n) if png_name(i) not in names]
        extra = len(files) - (n - len(missing))
        if missing or extra:
            what = f"{len(missing)} of {n} images missing (first: {missing[:3]})" if missing else ""
            if extra:
                what += ("; " if what else "") + f"{extra} numbered PNGs beyond index {n - 1}"
            raise ValueError(
                f"sample folder {folder} is incomplete: {what}"
                + (f" (settings.json says {expected})" if expected is not None else " (numbering gaps)")
                + "; finish it with `mvar generate` (same arguments) before scoring"
            )
        return files
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _open_rgb(p: Path) -> np.ndarray:
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image {p} is unreadable or truncated ({e})") from None


def _npz_images_shape(source: Path) -> tuple[int, ...]:
    """Shape of an image npz's ``arr_0`` (uint8 N, H, W, 3); errors name the file."""
    try:
        keys = npz_keys(source)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{source} is not an npz (zip) file ({e}); expected an npz with arr_0 "
                         "uint8 (N, H, W, 3) or a PNG folder") from None  # fmt: skip
    if "arr_0" not in keys:
        raise ValueError(f"{source} has no arr_0 (it has {sorted(keys)}); expected the images as "
                         "arr_0 uint8 (N, H, W, 3)")  # fmt: skip
    shape, dtype = npz_array_shape(source, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{source}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
    return tuple(shape)


def image_size(source: Path, files: list[Path] | None = None) -> tuple[int, int]:
    """(H, W) of a source's images (its first image; iter_images checks the rest)."""
    if source.is_dir():
        files = files if files is not None else _png_files(source)
        h, w = _open_rgb(files[0]).shape[:2]
        return int(h), int(w)
    shape = _npz_images_shape(source)
    return int(shape[1]), int(shape[2])


def count_images(source: Path, files: list[Path] | None = None) -> int:
    """Images in a folder or an npz ``arr_0`` (``files``: the folder's listing, if known)."""
    if source.is_dir():
        return len(files if files is not None else _png_files(source))
    return int(_npz_images_shape(source)[0])


def iter_images(
    source: Path, batch: int, files: list[Path] | None = None
) -> Iterator[np.ndarray]:
    """uint8 (b, H, W, 3) batches of a folder or an npz ``arr_0``, in index order
    (``files``: the folder's listing, if known)."""
    if source.is_dir():
        files = files if files is not None else _png_files(source)
        for lo in range(0, len(files), batch):
            imgs = [_open_rgb(p) for p in files[lo : lo + batch]]
            shapes = {im.shape for im in imgs}
            if len(shapes) > 1:
                raise ValueError(
                    f"{source}: images of different sizes {sorted(shapes)}; the ADM protocol "
                    "scores one fixed resolution, resize them first"
                )
            yield np.stack(imgs)
    else:
        yield from iter_npz_array(source, "arr_0", batch)


def source_fingerprint(source: Path, files: list[Path] | None = None) -> str:
    """Content id of an image source for the feature cache: the npz's sha256, or for a folder
    a hash of (name, size, mtime) of every image (``files``: the folder's listing, if known)."""
    if not source.is_dir():
        return sha256_file(source)
    h = hashlib.sha256()
    settings = source / "settings.json"  # the content key of what made the pixels
    if settings.is_file():
        h.update(settings.read_bytes())
    for p in files if files is not None else _png_files(source):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def extract_source(
    source: Path,
    extractor: InceptionExtractor,
    cache_dir: Path | None = None,
    desc: str = "inception",
    fingerprint: str | None = None,
) -> Features:
    """Inception features of every image of ``source`` (cached when ``cache_dir`` is given;
    ``fingerprint``: its :func:`source_fingerprint` if already known)."""
    files = _png_files(source) if source.is_dir() else None  # list a 50k folder once
    cache = None
    if cache_dir is not None:
        fingerprint = fingerprint or source_fingerprint(source, files)
        # Keyed by content: the images, the weights, the batch and the device (GPU and CPU
        # convolutions round differently).
        key = hashlib.sha256(
            f"{fingerprint}|{extractor.info.sha256}|{extractor.batch_size}|"
            f"{extractor.device.type}|{CACHE_VERSION}".encode()
        ).hexdigest()[:24]
        cache = cache_dir / f"features-{key}.npz"
        if cache.is_file():
            try:
                feats = Features.load(cache)
            except FeatureCacheError as e:  # never half-used: extract again and overwrite
                log.warning("%s; extracting the features of %s again", e, source)
            else:
                log.info("features of %s from cache %s", source, cache)
                return feats
    n = count_images(source, files)
    feats = extractor.extract(
        iter_images(source, extractor.batch_size, files), total=n, desc=desc
    )
    if len(feats) != n:
        raise RuntimeError(f"{source}: extracted {len(feats)} feature rows for {n} images")
    if cache is not None:
        feats.save(cache)
    return feats


def _samples_settings(samples: Path) -> dict | None:
    """settings.json of a sample folder, or of the folder an npz was packed from."""
    packed_from = samples.with_name(samples.name.removesuffix(".npz"))
    for cand in (samples / "settings.json", packed_from / "settings.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return None


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def _status_of(fn):  # -> (value, "ok") or (None, "error: ...")
    try:
        return fn(), "ok"
    except (ValueError, np.linalg.LinAlgError) as e:
        log.error("%s", e)
        return None, f"error: {e}"


def evaluate(
    samples: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    inception_weights: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 50,
    strict_weights_hash: bool = False,
    extractor_label: str | None = None,
    is_splits: int = 10,
    is_shuffle: bool = True,
    is_shuffle_seed: int = IS_SHUFFLE_SEED,
    pr_k: int = 3,
    pr_block: int = 4096,
    fid_method: FidMethod = "sqrtm",
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    """All metrics of ``samples`` against ``reference``, as a JSON-ready dict (module doc)."""
    from mvar.env import device_name, git_sha

    samples, reference = Path(samples), Path(reference)
    for name, value in (("pr_k", pr_k), ("is_splits", is_splits), ("batch_size", batch_size),
                        ("pr_block", pr_block)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not samples.exists():
        raise FileNotFoundError(
            f"samples {samples} not found (looked at {samples.resolve()}); make them with `mvar generate ... --npz`"
        )
    if not reference.exists():
        raise missing_file_error(
            reference, "reference", f"{reference.resolve().parent} (from --reference or "
            f"${REFERENCE_ENV})", REFERENCE_URL,
        )  # fmt: skip
    device = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    cache = Path(cache_dir) if cache_dir is not None else None

    # What the reference offers, before spending minutes on the samples.
    if reference.is_dir():
        ref_info = {
            "reference_kind": "image folder",
            "reference_sha256": source_fingerprint(reference),
        }
        ref_mu = ref_sigma = ref_mu_s = ref_sigma_s = None
        ref_images = True
    else:
        try:
            keys = npz_keys(reference)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(
                f"reference {reference} is not an npz (zip) file ({e}); expected an ADM reference "
                f"batch ({REFERENCE_URL}), an image npz or an image folder"
            ) from None
        if not ({"mu", "sigma"} <= set(keys) or "arr_0" in keys):
            raise KeyError(
                f"reference {reference} has neither mu/sigma nor arr_0 (it has {sorted(keys)}); "
                f"expected an ADM reference batch ({REFERENCE_URL}) or an image npz"
            )
        ref = load_reference(reference)
        ref_info = {
            "reference_kind": "ADM reference batch" if ref.mu is not None else "image npz",
            "reference_sha256": ref.sha256,
            "reference_keys": sorted(ref.keys),
        }
        ref_mu, ref_sigma, ref_images = ref.mu, ref.sigma, ref.has_images
        ref_mu_s, ref_sigma_s = ref.mu_s, ref.sigma_s
        if ref_mu_s is not None and ref_mu_s.shape != (SFID_DIM,):
            raise ValueError(
                f"reference {reference}: mu_s has shape {ref_mu_s.shape}, expected ({SFID_DIM},) "
                f"(the ADM evaluator's mixed_6/conv[..., :7] statistics, {REFERENCE_URL})"
            )

    # The samples: complete, readable, at the reference's resolution (checked before any
    # feature is extracted).
    sample_files = _png_files(samples) if samples.is_dir() else None
    n_samples = count_images(samples, sample_files)
    size = image_size(samples, sample_files)
    if ref_images:
        ref_size = image_size(reference)
        if ref_size != size:
            raise ValueError(
                f"samples {samples} are {size[0]}x{size[1]} but the reference {reference} holds "
                f"{ref_size[0]}x{ref_size[1]} images; the protocol compares sets at one resolution"
            )
    if n_samples < max(2, is_splits, pr_k + 1):
        raise ValueError(f"samples {samples}: {n_samples} images are too few (FID needs 2, IS "
                         f"{is_splits} splits, precision/recall k+1 = {pr_k + 1})")  # fmt: skip

    extractor = InceptionExtractor(
        inception_weights, device=device, batch_size=batch_size,
        strict_hash=strict_weights_hash, label=extractor_label,
    )  # fmt: skip
    fake = extract_source(samples, extractor, cache, desc="inception (samples)")
    real = (
        extract_source(
            reference, extractor, cache, "inception (reference)", str(ref_info["reference_sha256"])
        )
        if ref_images
        else None
    )

    out: dict[str, object] = {
        "samples": str(samples),
        "reference": str(reference),
        "num_samples": len(fake),
        "num_reference_images": len(real) if real is not None else None,
        **ref_info,
        **extractor.info.as_dict(),
        "device": device_name(device),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples_settings": _samples_settings(samples),
    }
    gen = out["samples_settings"] or {}
    # What made the samples, on the result row itself (issue: every row names its kernel).
    for key, src in (("na_backend", "na_backend"), ("sample_dtype", "dtype"),
                     ("sample_device", "device"), ("checkpoint_sha256", "checkpoint_sha256"),
                     ("vae_sha256", "vae_sha256"), ("samples_content_key", "content_key")):  # fmt: skip
        out[key] = gen.get(src, "unknown") if isinstance(gen, dict) else "unknown"

    # FID: against precomputed statistics when the reference has them (the ADM protocol).
    mu, sigma = feature_statistics(fake.pool)
    if ref_mu is not None:
        out["fid_reference"] = "precomputed mu/sigma of the reference npz"
        out["fid"], out["fid_status"] = _status_of(
            lambda: frechet_distance(mu, sigma, ref_mu, ref_sigma, method=fid_method)
        )
    else:
        out["fid_reference"] = "statistics of the reference images"
        mu_r, sigma_r = feature_statistics(real.pool)  # type: ignore[union-attr]
        out["fid"], out["fid_status"] = _status_of(
            lambda: frechet_distance(mu, sigma, mu_r, sigma_r, method=fid_method)
        )
    out["fid_method"] = fid_method

    is_val, out["is_status"] = _status_of(
        lambda: inception_score(fake.logits, is_splits, is_shuffle, is_shuffle_seed)
    )
    out["is_mean"], out["is_std"] = is_val if is_val is not None else (None, None)
    out["is_protocol"] = {
        "splits": is_splits,
        "shuffle": "canonical order + RandomState permutation" if is_shuffle else "file order",
        "seed": is_shuffle_seed,
        "features": "logits_unbiased (pool_3 x W, no bias), softmax in float64",
    }

    if real is not None:
        pr, out["pr_status"] = _status_of(
            lambda: precision_recall(real.pool, fake.pool, pr_k, pr_block)
        )
        out["precision"], out["recall"] = pr if pr is not None else (None, None)
    else:
        out["precision"] = out["recall"] = None
        out["pr_status"] = "not measured: the reference has no images (arr_0)"
    out["pr_k"] = pr_k

    # sFID: the same Fréchet distance on the spatial features (docs/evaluation.md §3.5), against
    # the reference's precomputed mu_s/sigma_s when it has them, like FID.
    out["sfid_feature"] = SFID_FEATURE
    out["sfid"] = None
    if ref_mu_s is not None:
        out["sfid_reference"] = "precomputed mu_s/sigma_s of the reference npz"
        ref_stats_s = (ref_mu_s, ref_sigma_s)
    elif real is not None:
        out["sfid_reference"] = "spatial statistics of the reference images"
        ref_stats_s = feature_statistics(real.spatial)
    else:
        out["sfid_reference"] = None
        out["sfid_status"] = "not measured: the reference has neither mu_s/sigma_s nor images"
    if out["sfid_reference"] is not None:
        mu_s, sigma_s = feature_statistics(fake.spatial)
        out["sfid"], out["sfid_status"] = _status_of(
            lambda: frechet_distance(mu_s, sigma_s, *ref_stats_s, method=fid_method)
        )
    log.info(
        "FID %s  sFID %s  IS %s  precision %s  recall %s  (N=%d)",
        out["fid"], out["sfid"], out["is_mean"], out["precision"], out["recall"], len(fake),
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------


def append_csv(result: dict[str, object], path: str | os.PathLike[str]) -> Path:
    """Append one row (header written for a new file; a file with another header is refused).
    The whole file is rewritten through a temporary, so a crash never leaves half a row."""
    p = Path(path)
    old = p.read_text() if p.is_file() else ""
    if old:
        header = next(csv.reader(io.StringIO(old)))
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{p} has columns {header}, expected {list(CSV_COLUMNS)}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    if not old:
        w.writeheader()
    w.writerow({k: ("" if result.get(k) is None else result.get(k)) for k in CSV_COLUMNS})
    return atomic_write(p, lambda tmp: tmp.write_text(old + buf.getvalue()))


def errored_metrics(result: dict[str, object]) -> list[str]:
    """Metrics whose status is an error ("not measured: ..." and "not supported: ..." are not)."""
    return [k.removesuffix("_status") for k, v in result.items()
            if k.endswith("_status") and isinstance(v, str) and v.startswith("error")]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mvar evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help="PNG folder or npz (arr_0 uint8 N,H,W,3)")
    p.add_argument(
        "--reference",
        default=os.environ.get(REFERENCE_ENV),
        help=f"ADM reference npz, or another image folder/npz (default: ${REFERENCE_ENV})",
    )
    p.add_argument(
        "--inception-weights",
        help="weights-inception-2015-12-05-6726825d.pth (default: $MVAR_INCEPTION_WEIGHTS, "
        "then the torch hub cache)",
    )
    p.add_argument("--strict-weights-hash", action="store_true",
                   help="fail if the weights' sha256 does not match the official prefix")  # fmt: skip
    p.add_argument("--out", help="results JSON (default: <samples>.eval.json)")
    p.add_argument("--csv", default="outputs/eval_results.csv", help="CSV to append a row to")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--no-is-shuffle", action="store_true", help="IS over file order (ADM)")
    p.add_argument("--is-seed", type=int, default=IS_SHUFFLE_SEED)
    p.add_argument("--pr-k", type=int, default=3)
    p.add_argument("--pr-block", type=int, default=4096, help="rows per distance tile")
    p.add_argument(
        "--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
        help="square root in FID and sFID: sqrtm (ADM evaluator, default) or eigh (same value "
        "for covariances, faster)",
    )  # fmt: skip
    p.add_argument("--cache-dir", help="cache extracted features here")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    from mvar.cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    if not args.reference:
        raise ValueError(
            f"no reference given: pass --reference or set ${REFERENCE_ENV} (the ADM batch "
            f"is {REFERENCE_URL})"
        )
    samples = Path(args.samples)
    # Output paths checked before minutes of feature extraction, not after.
    out = check_output_file(
        args.out or samples.with_name(samples.name.removesuffix(".npz") + ".eval.json"), "--out"
    )
    csv_path = check_output_file(args.csv, "--csv")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir {args.cache_dir} is a file; expected a directory")
    result = evaluate(
        args.samples,
        args.reference,
        inception_weights=args.inception_weights,
        device=args.device,
        batch_size=args.batch_size,
        strict_weights_hash=args.strict_weights_hash,
        is_splits=args.is_splits,
        is_shuffle=not args.no_is_shuffle,
        is_shuffle_seed=args.is_seed,
        pr_k=args.pr_k,
        pr_block=args.pr_block,
        fid_method=args.fid_method,
        cache_dir=args.cache_dir,
    )
    atomic_write_json(out, result)
    append_csv(result, csv_path)
    log.info("wrote %s and a row of %s", out, csv_path)
    failed = errored_metrics(result)
    if failed:  # the numbers that were measured are written; the run still failed
        raise RuntimeError(
            f"metric(s) {', '.join(failed)} failed: "
            + "; ".join(str(result[f"{m}_status"]) for m in failed) + f" (details in {out})"
        )
    return result


if __name__ == "__main__":
    from mvar.cli import run_command

    run_command(main, "evaluate")
