"""The progressive ablation (d16, batch 32): (a) VAR → (b) + scale-Markov → (c) + spatial-Markov.

    python -m repro.ablation --out reports/

Writes ``ablation.csv`` (long format) and ``ablation.md`` (paper vs ours with the ratio). The
compute columns are produced exactly as for Table 2 (``repro.table2``): GFLOPs ``counted`` on
the real models under ``FakeTensorMode`` and ``analytic``; memory ``estimated`` at paper size
(and ``measured`` on a GPU); CPU latency at the tiny presets of the three variants. The
FID/IS/P/R columns need the authors' ablation models, which were not released: status rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from repro import paper
from repro.report import ResultRow, capture_environment, write_csv, write_markdown
from repro.rows import (
    MEMORY_NOTES,
    Options,
    compute_rows,
    cpu_load,
    gpu_rows,
    parse_options,
    quality_rows,
    ratio_rows,
    report_sections,
    tiny_rows,
)

log = logging.getLogger(__name__)

SPATIAL_NOTE = (
    "(b) and (c) differ only on scales 8 and 9. With fused attention neither keeps a score "
    "matrix, so their estimates coincide. A non-fused full attention over the 16x16 scale holds "
    "2B·H·256²·4 B = 256 MiB of scores at d16, batch 32 (and as much again for their softmax), "
    "a 7x7 neighbourhood kernel 2B·H·256·49·4 B = 49 MiB: the same order as the paper's "
    "(b) → (c) drop of 4199 − 3846 = 353 MiB (analytic remark, not a measurement)."
)

# (a), (b), (c): the paper's names are presets here (paper.ABLATION_LABELS).
ABLATION_MODELS: tuple[str, ...] = ("var-d16", "mvar-d16-scale-markov", "mvar-d16")
TINY_VARIANTS: tuple[str, ...] = ("var-tiny", "mvar-tiny-scale-markov", "mvar-tiny")
NOT_RELEASED = (
    "needs the ablation checkpoints (a)-(c), trained by the authors for this figure and not "
    "released, and a 50k-sample ADM evaluation"
)


def run(opts: Options) -> list[Path]:
    """Produce the ablation's CSV and markdown; returns the paths."""
    t0 = time.perf_counter()
    env = replace(capture_environment(opts.device, torch.float32), dtype=opts.dtype_label)
    rows: list[ResultRow] = []
    for model in tqdm(ABLATION_MODELS, desc="ablation", leave=False):
        rows += compute_rows(env, "ablation", model, model, opts)
        rows += gpu_rows(env, "ablation", model, model, opts)
        rows += quality_rows(env, "ablation", model, NOT_RELEASED, opts.batch)
    # Memory ratio of (a) over (b) and over (c), on the later variant's row.
    rows += ratio_rows(
        env, "ablation",
        [("var-d16", "var-d16", m, m) for m in ABLATION_MODELS[1:]], opts,
    )  # fmt: skip
    load = cpu_load()
    rows += tiny_rows(env, "ablation", list(TINY_VARIANTS), opts)
    csv_path = write_csv(rows, opts.out / "ablation.csv")
    labels = "; ".join(f"{m} = {paper.ABLATION_LABELS[m]}" for m in ABLATION_MODELS)
    md = write_markdown(
        csv_path, opts.out / "ablation.md",
        title="Ablation: scale-Markov and spatial-Markov (d16, batch 32)",
        sections=report_sections(rows, "ablation"),
        notes=(f"Variants: {labels}. Tiny CPU stand-ins: {', '.join(TINY_VARIANTS)}.",
               "`inference_memory_ratio` on a row = var-d16's estimate / that row's estimate.",
               SPATIAL_NOTE,
               *MEMORY_NOTES,
               load,
               f"Run time of this session: {time.perf_counter() - t0:.0f} s."),
    )  # fmt: skip
    log.info("ablation done in %.0f s", time.perf_counter() - t0)
    return [csv_path, md]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The same options as ``repro.table2`` (the figure is Table 2's, never drawn here)."""
    return replace(parse_options(argv, __doc__.split("\n\n")[0]), figure=False)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in run(parse_args(argv)):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
