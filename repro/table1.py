"""Table 1 (class-conditional ImageNet 256x256): FID / IS / precision / recall of VAR-d16 and
MVAR-d16, generated and scored with the ADM protocol (EVALUATION.md, MVAR.md §5).

Paper scale (needs a GPU in practice; files from options, env vars or the checkpoint dirs)::

    python -m repro.table1 --var-ckpt var_d16.pth --mvar-ckpt mvar-d16.pth \\
        --vae-ckpt vae_ch160v4096z32.pth --inception-weights weights-inception-...pth \\
        --reference VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc_per_node 8 -m repro.table1 ...       # generation over 8 GPUs

Bare file names are looked up like every checkpoint (``mvar.checkpoint.resolve_checkpoint``:
the current directory, ``$MVAR_CHECKPOINT_DIR``, ``checkpoints/``, ``pretrained/``); the
Inception weights come from ``--inception-weights`` / ``$MVAR_INCEPTION_WEIGHTS`` / the torch
hub cache, the reference from ``--reference`` / ``$MVAR_REFERENCE_NPZ``. For each model it
samples 50 images x 1000 classes with the checkpoint's official settings
(``mvar.config.SAMPLING_PRESETS``), packs the npz and scores it. Every cell whose inputs are
missing is a row with ``status="not measured: missing <file>"``.

Embedded toy run (a CPU laptop, minutes)::

    python -m repro.table1 --embedded                      # random-init tiny models
    python -m repro.table1 --embedded --train-steps 300    # briefly trained first (slower)

runs the same code (generate -> npz -> Inception -> metrics) on the tiny presets
(``var-tiny``/``mvar-tiny`` standing in for VAR-d16/MVAR-d16, with their official sampling
settings), 4 classes x 4 images, a reference of held-out images of the generated shapes data
set (``mvar.data.SyntheticShapes``) and a random-weights Inception labelled
``random-init inception (NOT comparable to paper)``. Its rows (table ``table1-embedded``) are
real measurements of that toy setting and carry no paper value.

Both write ``reports/table1.csv`` (long format, ``repro.report.COLUMNS``; the paper-scale rows
always, the embedded rows with ``--embedded``) and ``reports/table1.md`` (paper vs ours).
Paper numbers come from ``repro.paper`` (``TABLE1``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mvar import dist, inception
from mvar.checkpoint import CHECKPOINT_FILES, VAE_FILE
from mvar.checkpoint import DOWNLOADS as CHECKPOINT_DOWNLOADS
from mvar.config import sampling_for
from mvar.data import SyntheticShapes
from mvar.evaluate import evaluate
from mvar.generate import (
    GenerationSettings,
    build_sampler,
    generate_samples,
    pack_npz,
    to_uint8,
)
from mvar.io import atomic_path, atomic_write_json
from mvar.metrics import REFERENCE_ENV, REFERENCE_URL, feature_statistics
from repro import paper
from repro.report import (
    ResultRow,
    capture_environment,
    environment_line,
    make_row,
    markdown_table,
    not_measured,
    read_csv,
    write_csv,
)

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("fid", "is", "precision", "recall")  # Table 1's quality columns
# evaluate() result key of each metric.
RESULT_KEYS: dict[str, tuple[str, str]] = {
    "fid": ("fid", "fid_status"),
    "is": ("is_mean", "is_status"),
    "precision": ("precision", "pr_status"),
    "recall": ("recall", "pr_status"),
}
# The two reproduced rows of Table 1: (model name in repro.paper, default checkpoint file).
MODELS: tuple[tuple[str, str], ...] = tuple((m, CHECKPOINT_FILES[m]) for m in ("var-d16", "mvar-d16"))
REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"
# Embedded toy run: tiny stand-ins of the two rows.
EMBEDDED_MODELS: tuple[tuple[str, str], ...] = (("var-d16", "var-tiny"), ("mvar-d16", "mvar-tiny"))
EMBEDDED_TABLE = "table1-embedded"
# Where each input of the paper-scale rows comes from (checkpoints: mvar.checkpoint.DOWNLOADS).
DOWNLOADS: dict[str, str] = {
    **{f: CHECKPOINT_DOWNLOADS[f] for f in (*(f for _, f in MODELS), VAE_FILE)},
    inception.WEIGHTS_FILENAME: inception.WEIGHTS_URL,
    REFERENCE_FILE: REFERENCE_URL,
}


@dataclass(frozen=True)
class RunConfig:
    per_class: int
    num_classes: int
    batch_size: int
    seed: int
    seed_mode: str
    uint8: str
    dtype: str
    eval_batch: int
    fid_method: str
    is_splits: int = 10


def _paper_values_present() -> None:
    # Table 1 must be in the registry; fail early rather than write rows without paper values.
    for model, _ in MODELS:
        for metric in METRICS:
            if paper.paper_value("table1", model, metric) is None:
                raise KeyError(f"repro.paper has no table1 value for {model}/{metric}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _find_checkpoint(path: str) -> tuple[Path | None, str]:
    from mvar.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path), ""
    except FileNotFoundError as e:
        log.warning("%s", e)
        return None, f"missing {Path(path).name}"


def _find_weights(path: str | None) -> tuple[Path | None, str]:
    try:
        return inception.resolve_weights(path), ""
    except FileNotFoundError as e:
        log.warning("%s", e)
        return None, f"missing {inception.WEIGHTS_FILENAME}"


def _find_reference(path: str | None) -> tuple[Path | None, str]:
    if path and Path(path).is_file():
        return Path(path), ""
    where = path or f"${REFERENCE_ENV} unset"
    log.warning(
        "reference %s not found (%s); download it from %s", REFERENCE_FILE, where, REFERENCE_URL
    )
    return None, f"missing {REFERENCE_FILE}"


# --------------------------------------------------------------------------------------------
# One model: generate -> npz -> evaluate -> rows
# --------------------------------------------------------------------------------------------


def _model_rows(
    env, table: str, model: str, run: Callable[[], dict | None], batch: int
) -> list[ResultRow]:  # type: ignore[no-untyped-def]
    """Rows of one model: ``run()`` generates and scores it (None on ranks other than 0); an
    exception becomes one "not measured: error: ..." row per metric instead of aborting the
    table. Paper values come from ``repro.paper`` under ``table`` (none for the toy table)."""
    try:
        result = run()
    except Exception as e:
        log.exception("%s failed", model)
        return [not_measured(env, table, model, m, f"error: {type(e).__name__}: {e}",
                             batch=batch) for m in METRICS]  # fmt: skip
    if result is None:
        return []
    rows = []
    for metric in METRICS:
        key, status_key = RESULT_KEYS[metric]
        value, status = result.get(key), str(result.get(status_key, "ok"))
        if value is None or status != "ok":
            rows.append(not_measured(env, table, model, metric, status, batch=batch))
        else:
            rows.append(make_row(env, table, model, metric, float(value), method="measured",
                                 batch=batch, status="ok"))  # fmt: skip
    return rows


def run_model(
    name: str,
    preset: str,
    ckpt: Path | None,
    vae_ckpt: Path | None,
    reference: Path,
    weights: Path,
    cfg: RunConfig,
    work_dir: Path,
    device: torch.device,
    extractor_label: str | None = None,
) -> dict[str, object] | None:
    """Generate and score one model; the result dict on rank 0, None elsewhere.

    ``name`` is the paper's model (it selects the official sampling settings and names the
    outputs), ``preset`` the architecture that is built (the same at paper scale, a tiny
    stand-in in the embedded run), ``ckpt`` its weights (None: random init).
    """
    sampling = sampling_for(name, None, None, None)  # the checkpoint's official settings
    settings = GenerationSettings(
        model=preset,
        checkpoint=ckpt.stem if ckpt is not None else "random-init",
        cfg=sampling.cfg, top_k=sampling.top_k, top_p=sampling.top_p, more_smooth=False,
        seed=cfg.seed, seed_mode=cfg.seed_mode,  # type: ignore[arg-type]
        per_class=cfg.per_class, classes=tuple(range(cfg.num_classes)),
        batch_size=cfg.batch_size, uint8=cfg.uint8, dtype=cfg.dtype,  # type: ignore[arg-type]
    )  # fmt: skip
    sampler = build_sampler(preset, ckpt, vae_ckpt, sampling, device, cfg.dtype)
    folder = generate_samples(sampler, settings, work_dir / "samples", device=device)
    if not dist.is_main():
        return None
    npz = folder.with_name(folder.name + ".npz")
    if not npz.is_file():
        pack_npz(folder, npz, expected=settings.num_images)
    result = evaluate(
        npz, reference, inception_weights=weights, device=device, batch_size=cfg.eval_batch,
        extractor_label=extractor_label, fid_method=cfg.fid_method,  # type: ignore[arg-type]
        is_splits=cfg.is_splits,
        cache_dir=work_dir / "features",
    )  # fmt: skip
    result["generation"] = settings.to_json()
    atomic_write_json(work_dir / f"{name}.eval.json", result)
    return result


# --------------------------------------------------------------------------------------------
# Paper scale and embedded
# --------------------------------------------------------------------------------------------


def paper_scale_rows(
    args: argparse.Namespace, cfg: RunConfig, device: torch.device
) -> list[ResultRow]:
    env = capture_environment(device, cfg.dtype)
    vae, vae_missing = _find_checkpoint(args.vae_ckpt)
    weights, w_missing = _find_weights(args.inception_weights)
    reference, r_missing = _find_reference(args.reference)
    rows: list[ResultRow] = []
    for name, default_file in MODELS:
        ckpt, c_missing = _find_checkpoint(
            getattr(args, f"{name.split('-')[0]}_ckpt") or default_file
        )
        missing = [
            m.removeprefix("missing ") for m in (c_missing, vae_missing, w_missing, r_missing) if m
        ]
        if missing:
            reason = "missing " + ", ".join(missing)
            rows += [
                not_measured(env, "table1", name, m, reason, batch=cfg.batch_size) for m in METRICS
            ]
            continue
        rows += _model_rows(
            env, "table1", name,
            functools.partial(run_model, name, name, ckpt, vae, reference, weights, cfg,  # type: ignore[arg-type]
                              Path(args.work_dir), device, None),
            cfg.batch_size,
        )  # fmt: skip
    return rows


def synthetic_reference(
    path: Path,
    num_classes: int,
    per_class: int,
    size: int,
    weights: Path,
    label: str,
    seed: int = 1,
) -> Path:
    """An ADM-shaped reference for the toy run: ``arr_0`` = images of the generated shapes
    data set (``mvar.data.SyntheticShapes``, the embedded training data; ``seed`` 1 keeps them
    apart from the training images of seed 0) and their precomputed ``mu``/``sigma``
    (random-weights Inception), so the toy run takes the paper's FID-vs-statistics path."""
    if path.is_file():
        return path
    data = SyntheticShapes(num_classes, per_class, size, seed)
    img01 = torch.stack([(data[i][0] + 1) / 2 for i in range(len(data))])
    arr = to_uint8(img01, "round")
    feats = inception.InceptionExtractor(weights, label=label).extract([arr])
    mu, sigma = feature_statistics(feats.pool)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, mu=mu, sigma=sigma, arr_0=arr)
    return path


def train_tiny(preset: str, steps: int, num_classes: int, work: Path, device: torch.device) -> Path:
    """Briefly train a tiny preset on the generated shapes (``mvar.train``; resumable: a
    finished run is reused). The VQ-VAE is the seeded random-init one that ``load_pretrained``
    builds too, so the sampler decodes with the VQ-VAE the tokens came from."""
    from mvar.train import TrainConfig, train

    if dist.get_world_size() > 1:
        raise RuntimeError("--train-steps runs in a single process (mvar.train owns the group)")
    cfg = TrainConfig(
        model=preset, out_dir=str(work / "train" / preset), steps=steps, batch_size=16,
        # A toy model needs a toy learning rate: the paper's 1e-4·batch/256 rule gives 6e-6 here.
        lr=3e-3, warmup_steps=min(10, steps),
        synthetic_classes=num_classes, synthetic_per_class=16, seed=0, device=str(device),
        ckpt_every=max(steps // 4, 1),
    )  # fmt: skip
    return train(cfg)


def embedded_rows(
    args: argparse.Namespace, cfg: RunConfig, device: torch.device
) -> list[ResultRow]:
    work = Path(args.work_dir) / "embedded"
    env = capture_environment(device, cfg.dtype)
    label = inception.RANDOM_EXTRACTOR_LABEL
    weights = work / "random-inception.pth"
    if dist.is_main() and not weights.is_file():
        inception.save_random_inception_weights(weights, seed=0)
    dist.barrier()
    from mvar.config import get_preset

    size = get_preset(EMBEDDED_MODELS[0][1]).vae.image_size
    reference = work / f"shapes-reference-{cfg.num_classes}x{cfg.per_class}.npz"
    if dist.is_main():
        synthetic_reference(reference, cfg.num_classes, cfg.per_class, size, weights, label)
    dist.barrier()
    rows: list[ResultRow] = []
    for name, preset in EMBEDDED_MODELS:

        def run(name: str = name, preset: str = preset) -> dict | None:
            ckpt = None
            if args.train_steps:
                ckpt = train_tiny(preset, args.train_steps, cfg.num_classes, work, device)
            return run_model(name, preset, ckpt, None, reference, weights, cfg, work, device,
                             label)  # fmt: skip

        rows += _model_rows(env, EMBEDDED_TABLE, preset, run, cfg.batch_size)
    return rows


def write_markdown_report(
    csv_path: Path, md_path: Path, cfg: RunConfig, embedded: bool, train_steps: int = 0
) -> Path:
    weights_note = (
        f"trained {train_steps} steps on the generated shapes" if train_steps else "random init"
    )
    df = read_csv(csv_path)
    out = [
        "# Table 1 — class-conditional ImageNet 256x256 (FID, IS, precision, recall)",
        "",
        f"Source: `{csv_path.name}`. {environment_line(df)}.",
        "",
        "## Paper scale: VAR-d16 (official weights) and MVAR-d16 (trained from scratch)",
        "",
        markdown_table(df[df["table"] == "table1"]),
    ]
    if embedded:
        part = df[df["table"] == EMBEDDED_TABLE]
        out += [
            "## Embedded toy run (NOT comparable to paper)",
            "",
            (
                f"Tiny presets ({weights_note}) standing in for VAR-d16 / MVAR-d16 with their "
                f"official sampling settings, {cfg.num_classes} classes x {cfg.per_class} "
                "images, a reference of held-out images of the generated shapes data set, and "
                f"extractor `{inception.RANDOM_EXTRACTOR_LABEL}`. The numbers are real "
                "measurements of that toy setting and show the pipeline runs end to end; they "
                "say nothing about the paper's claims."
            ),
            "",
            markdown_table(part),
        ]
    out += [
        "## Notes",
        "",
        (
            "- Protocol: 50 images per class x 1000 classes, official per-checkpoint sampling "
            "settings (`mvar.config.SAMPLING_PRESETS`), PNG, npz `arr_0`; FID against the "
            "reference batch's precomputed mu/sigma; IS over splits after a fixed-seed "
            "canonical shuffle; precision/recall with k = 3 against the reference's 10k images "
            "(`mvar.metrics`, `mvar.evaluate`)."
        ),
        (
            f"- uint8 conversion: {cfg.uint8}; g_seed: seed {cfg.seed}, mode {cfg.seed_mode}; "
            f"FID square root: {cfg.fid_method}; IS splits: {cfg.is_splits}."
        ),
        f"- sFID: {inception.SFID_STATUS}.",
        "- Expected run-to-run spread (EVALUATION.md): about ±0.2 FID, ±7 IS, ±0.01 P/R.",
        (
            "- Inputs of the paper-scale rows and where to get them: "
            + "; ".join(f"`{f}`: {u}" for f, u in DOWNLOADS.items())
            + ". Pass them with the options of `python -m repro.table1 --help` or the env vars "
            f"`$MVAR_CHECKPOINT_DIR`, `${inception.WEIGHTS_ENV}`, `${REFERENCE_ENV}`."
        ),
        "",
    ]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(out))
    return md_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.table1", description=__doc__.split("\n")[0])
    p.add_argument("--var-ckpt", default=os.environ.get("MVAR_VAR_D16_CKPT", "var_d16.pth"))
    p.add_argument("--mvar-ckpt", default=os.environ.get("MVAR_MVAR_D16_CKPT", "mvar-d16.pth"))
    p.add_argument("--vae-ckpt", default=os.environ.get("MVAR_VAE_CKPT", VAE_FILE))
    p.add_argument(
        "--inception-weights", help=f"default: ${inception.WEIGHTS_ENV}, torch hub cache"
    )
    p.add_argument(
        "--reference", default=os.environ.get(REFERENCE_ENV), help=f"default: ${REFERENCE_ENV}"
    )
    p.add_argument("--embedded", action="store_true", help="also run the toy pipeline on CPU")
    p.add_argument(
        "--train-steps", type=int, default=0,
        help="embedded: train each tiny model this many steps on the generated shapes first "
        "(default 0: random init)",
    )  # fmt: skip
    p.add_argument("--out-dir", default="reports")
    p.add_argument("--work-dir", default="outputs/table1", help="samples, npz, features, JSON")
    p.add_argument("--per-class", type=int, help="default 50 (embedded: 4)")
    p.add_argument("--num-classes", type=int, help="default 1000 (embedded: 4)")
    p.add_argument("--batch-size", type=int, help="default 50 (embedded: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-mode", choices=("per-batch", "fixed"), default="per-batch")
    p.add_argument("--uint8", choices=("round", "truncate"), default="round")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--device", help="default: this rank's GPU, else cpu")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _paper_values_present()
    dist.init_from_env()
    try:
        device = torch.device(args.device) if args.device else dist.default_device()

        def run_cfg(embedded: bool) -> RunConfig:
            return RunConfig(
                per_class=args.per_class or (4 if embedded else 50),
                num_classes=args.num_classes or (4 if embedded else 1000),
                batch_size=args.batch_size or (8 if embedded else 50),
                seed=args.seed, seed_mode=args.seed_mode, uint8=args.uint8, dtype=args.dtype,
                eval_batch=args.eval_batch, fid_method=args.fid_method, is_splits=args.is_splits,
            )  # fmt: skip

        rows = paper_scale_rows(args, run_cfg(False), device)
        if args.embedded:
            rows += embedded_rows(args, run_cfg(True), device)
        out = Path(args.out_dir)
        if dist.is_main():
            csv_path = write_csv(rows, out / "table1.csv")
            md = write_markdown_report(
                csv_path, out / "table1.md", run_cfg(args.embedded), args.embedded,
                args.train_steps,
            )  # fmt: skip
            log.info("wrote %s and %s", csv_path, md)
        dist.barrier()
        return out / "table1.csv"
    finally:
        dist.destroy()


if __name__ == "__main__":
    main()
