"""Table 1 (class-conditional ImageNet 256x256): FID / IS / precision / recall (and sFID, which the
paper does not print) of VAR-d16 and MVAR-d16, generated and scored with the ADM protocol (docs/evaluation.md §1, docs/mvar.md §5).

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

Embedded study (a CPU laptop, <= 10 minutes; ``--embedded``, what ``nox -s repro_table1``
runs): :mod:`repro.embedded` -- a trained tokenizer, a domain evaluator, VAR-tiny vs MVAR-tiny
vs MVAR-dagger-tiny vs the scale-Markov ablation on generated shapes, with FID intervals and
measured compute. It writes ``reports/embedded/`` (its own report contract); ``--study long``
runs the longer, tighter version of the same code.

The paper-scale rows go to ``reports/table1.csv`` (long format, ``repro.report.COLUMNS``) and
``reports/table1.md`` (paper vs ours), the embedded study's to ``reports/embedded/``.
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

import torch

from mvar import dist, inception
from mvar.checkpoint import CHECKPOINT_FILES, VAE_FILE
from mvar.checkpoint import DOWNLOADS as CHECKPOINT_DOWNLOADS
from mvar.config import sampling_for
from mvar.evaluate import evaluate
from mvar.generate import (
    GenerationSettings,
    build_sampler,
    code_version,
    generate_samples,
    pack_npz,
)
from mvar.io import atomic_write_json
from mvar.metrics import REFERENCE_ENV, REFERENCE_URL
from mvar.precision import PRECISIONS
from repro import paper
from repro.embedded import STUDIES
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

# Table 1's quality columns, which carry the paper's numbers ...
PAPER_METRICS: tuple[str, ...] = ("fid", "is", "precision", "recall")
# ... and what the ADM protocol also measures; the paper prints no sFID, so its paper_value is
# empty (repro.paper.METRICS["sfid"]).
METRICS: tuple[str, ...] = (*PAPER_METRICS, "sfid")
# evaluate() result key of each metric.
RESULT_KEYS: dict[str, tuple[str, str]] = {
    "fid": ("fid", "fid_status"),
    "is": ("is_mean", "is_status"),
    "precision": ("precision", "pr_status"),
    "recall": ("recall", "pr_status"),
    "sfid": ("sfid", "sfid_status"),
}
# The two reproduced rows of Table 1: (model name in repro.paper, default checkpoint file).
MODELS: tuple[tuple[str, str], ...] = tuple((m, CHECKPOINT_FILES[m]) for m in ("var-d16", "mvar-scratch-d16"))
REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"
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
        for metric in PAPER_METRICS:
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
    sampler = build_sampler(preset, ckpt, vae_ckpt, sampling, device, cfg.dtype)
    settings = GenerationSettings(
        model=preset,
        guidance=sampling.guidance, top_k=sampling.top_k, top_p=sampling.top_p, more_smooth=False,
        seed=cfg.seed, seed_mode=cfg.seed_mode,  # type: ignore[arg-type]
        per_class=cfg.per_class, classes=tuple(range(cfg.num_classes)),
        batch_size=cfg.batch_size, uint8=cfg.uint8, dtype=cfg.dtype,  # type: ignore[arg-type]
        code_version=code_version(), **sampler.provenance,  # type: ignore[arg-type]
    )  # fmt: skip
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


def write_markdown_report(csv_path: Path, md_path: Path, cfg: RunConfig,
                          embedded_readme: Path | None = None) -> Path:  # fmt: skip
    df = read_csv(csv_path)
    out = [
        "# Table 1 — class-conditional ImageNet 256x256 (FID, IS, precision, recall, sFID)",
        "",
        f"Source: `{csv_path.name}`. {environment_line(df)}.",
        "",
        "## Paper scale: VAR-d16 (official weights) and MVAR-d16 (trained from scratch)",
        "",
        markdown_table(df[df["table"] == "table1"]),
        "## Embedded study (toy scale, CPU)",
        "",
        (
            f"See [{embedded_readme.parent.name}/{embedded_readme.name}]({embedded_readme.parent.name}/"
            f"{embedded_readme.name}) (`python -m repro.embedded`): trained tokenizer and domain "
            "evaluator, VAR-tiny vs MVAR-tiny vs MVAR†-tiny vs the scale-Markov ablation. Not "
            "comparable to the paper's numbers."
            if embedded_readme is not None
            else "Not run (`--embedded`, or `python -m repro.embedded`)."
        ),
        "",
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
        (
            "- sFID (not in the paper's Table 1, so no paper value; the official model zoo "
            "lists 6.26 for mvar-d16.pth, docs/paper_numbers.md §6): Fréchet distance on the "
            "spatial feature against the reference's mu_s/sigma_s; sfid_feature: "
            f"{inception.SFID_FEATURE} -- the post-ReLU choice is inferred, not checked "
            "against TensorFlow."
        ),
        "- Expected run-to-run spread (docs/evaluation.md §5): about ±0.2 FID, ±7 IS, ±0.01 P/R.",
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
    p.add_argument("--embedded", action="store_true",
                   help="also run the embedded study (repro.embedded) into <out-dir>/embedded")
    p.add_argument("--study", default="default", choices=sorted(STUDIES),
                   help="embedded study preset: default (<= 10 min on 2 cores), long, or "
                   "miniature (seconds, for tests)")  # fmt: skip
    p.add_argument("--cache-dir", default=os.environ.get("MVAR_CACHE_DIR", "outputs/cache"),
                   help="embedded: content-keyed artifact cache (default $MVAR_CACHE_DIR or "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--out-dir", default="reports")
    p.add_argument("--work-dir", default="outputs/table1", help="samples, npz, features, JSON")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-mode", choices=("per-batch", "fixed"), default="per-batch")
    p.add_argument("--uint8", choices=("round", "truncate"), default="round")
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32",
                   help="sampling precision (mvar.precision): fp32 = no autocast; bf16; fp16 "
                   "(GPU only); also the embedded study's with --embedded")  # fmt: skip
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--device", help="default: this rank's GPU, else cpu")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.embedded and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        parser.error(f"--cache-dir {args.cache_dir} exists and is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _paper_values_present()
    study = None
    if args.embedded:  # validate before any work
        from repro.embedded import get_study, with_dtype

        # The study runs on the CPU (below), so fp16 is refused here, before any work.
        study = with_dtype(get_study(args.study), args.dtype, torch.device("cpu"))
    dist.init_from_env()
    try:
        device = torch.device(args.device) if args.device else dist.default_device()
        cfg = RunConfig(
            per_class=args.per_class, num_classes=args.num_classes, batch_size=args.batch_size,
            seed=args.seed, seed_mode=args.seed_mode, uint8=args.uint8, dtype=args.dtype,
            eval_batch=args.eval_batch, fid_method=args.fid_method, is_splits=args.is_splits,
        )  # fmt: skip
        rows = paper_scale_rows(args, cfg, device)
        out = Path(args.out_dir)
        readme = None
        if study is not None and dist.is_main():
            from repro.embedded import run_study
            from repro.embedded_report import write_report

            # The study is a single-process CPU job; under torchrun only rank 0 runs it.
            result = run_study(study, Path(args.cache_dir), torch.device("cpu"))
            readme = write_report(result, out / "embedded")
        if dist.is_main():
            csv_path = write_csv(rows, out / "table1.csv")
            md = write_markdown_report(csv_path, out / "table1.md", cfg, readme)
            log.info("wrote %s and %s", csv_path, md)
        dist.barrier()
        failed = [f"{r.model}/{r.metric}: {r.status}" for r in rows if r.status.startswith("error")]
        if failed:  # a "not measured: missing <file>" cell is not a failure; an error is
            raise SystemExit("table1: metric(s) failed: " + "; ".join(failed))
        return out / "table1.csv"
    finally:
        dist.destroy()


if __name__ == "__main__":
    main()
