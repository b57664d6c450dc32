"""Table 2 (pre-trained VAR vs fine-tuned MVAR†) and the memory-vs-batch figure.

    python -m repro.table2 --out reports/

Writes ``table2.csv`` (long format, ``repro.report.COLUMNS``; Table 2 and the poster's batch-64
cells), ``table2.md`` (paper vs ours with the ratio), ``memory_vs_batch.csv`` and
``figures/memory_vs_batch.png`` (the motivation figure's panel c, drawn from the CSV).

What each column is on this machine (``method`` in every row):

* GFLOPs: ``counted`` by hooking the attention cores of the real model while it samples under
  ``FakeTensorMode`` (paper size, no allocation), and ``analytic`` from the config.
* KV cache: ``counted`` from the VAR sampler's K/V tensors (batch 32, CFG, fp32), and
  ``analytic``.
* Memory (inference and training): ``estimated`` as the peak of live tensor bytes under
  ``FakeTensorMode`` at paper size, fp32 (``repro.compute``); on a GPU also ``measured``
  (torch max-allocated, max-reserved, NVML device peak).
* Time (inference and training): ``measured`` on a GPU at batch 32; on a CPU only at the tiny
  presets (a different model size, so no paper value attaches), the paper-size cells are rows
  with ``status="not measured: ..."``.
* FID/IS/Pre/Rec: need the released checkpoints and a 50k-sample evaluation: status rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from mvar import profiling as prof
from mvar.checkpoint import CHECKPOINT_FILES, resolve_checkpoint
from repro import compute
from repro.report import (
    Environment,
    ResultRow,
    capture_environment,
    plot_memory_vs_batch,
    write_csv,
    write_markdown,
)
from repro.rows import (
    MEMORY_NOTES,
    TINY_FOR,
    Options,
    compute_rows,
    cpu_load,
    fake_device,
    gpu_rows,
    inference_estimate,
    parse_options,
    quality_rows,
    ratio_rows,
    report_sections,
    row,
    tiny_rows,
)

log = logging.getLogger(__name__)

DEPTHS: tuple[int, ...] = (16, 20, 24)
# (name in the paper's table, architecture preset). MVAR† is the fine-tuned MVAR; its
# architecture is the mvar-d* preset (docs/mvar.md §3: same parameters, another mask).
TABLE2_MODELS: tuple[tuple[str, str], ...] = tuple(
    pair
    for d in DEPTHS
    for pair in ((f"var-d{d}", f"var-d{d}"), (f"mvar-finetune-d{d}", f"mvar-d{d}"))
)
# The figure's six models (panel c): architectures, no checkpoints involved.
FIGURE_MODELS: tuple[str, ...] = tuple(f"{a}-d{d}" for a in ("var", "mvar") for d in DEPTHS)


def checkpoint_reason(model: str) -> str:
    """Why the quality cells of a Table 2 row are not measured (its file: CHECKPOINT_FILES)."""
    f = CHECKPOINT_FILES[model]
    try:
        resolve_checkpoint(f)
    except FileNotFoundError:
        return f"needs {f} (not available here) and a 50k-sample ADM evaluation"
    return f"{f} found; FID/IS/P/R need the 50k-sample evaluation (not run by this session)"


def memory_vs_batch_rows(env: Environment, opts: Options) -> list[ResultRow]:
    """Inference memory (token generation) vs batch for the figure's six models: estimated at
    every batch; on a GPU also measured (max-allocated), OOM kept as a status."""
    rows: list[ResultRow] = []
    fake_dev = fake_device()
    jobs = [(m, b) for m in FIGURE_MODELS for b in opts.figure_batches]
    for preset, b in tqdm(jobs, desc="memory vs batch", leave=False):
        est = inference_estimate(preset, b, b == opts.batch, opts.guidance)
        rows.append(row(env, "memory_vs_batch", preset, "inference_memory", prof.mib(est.tokens),
                        method="estimated", batch=b, device=fake_dev))  # fmt: skip
        if opts.on_gpu:
            try:
                m = compute.measure_inference_cuda(preset, b, device=opts.device,
                                                guidance=opts.guidance, top_k=opts.top_k,
                                                top_p=opts.top_p, phases=("tokens",),
                                                autocast_dtype=opts.autocast_dtype)  # fmt: skip
                rows.append(row(env, "memory_vs_batch", preset, "inference_memory_measured",
                                prof.mib(m["tokens"].max_allocated), method="measured", batch=b,
                                unit="MiB"))  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                rows.append(row(env, "memory_vs_batch", preset, "inference_memory_measured",
                                None, method="none", status="oom", batch=b, unit="MiB"))  # fmt: skip
            torch.cuda.empty_cache()
    return rows


def poster_rows(env: Environment, opts: Options) -> list[ResultRow]:
    """The poster's d24 cells at batch 64 (estimated, token generation)."""
    fake_dev = fake_device()
    v = inference_estimate("var-d24", 64, False, opts.guidance).tokens
    m = inference_estimate("mvar-d24", 64, False, opts.guidance).tokens
    return [
        row(env, "poster", "var-d24", "inference_memory", prof.mib(v), method="estimated",
            batch=64, device=fake_dev),
        row(env, "poster", "mvar-finetune-d24", "inference_memory", prof.mib(m),
            method="estimated", batch=64, device=fake_dev),
        row(env, "poster", "mvar-finetune-d24", "inference_memory_ratio", v / m,
            method="estimated", batch=64, device=fake_dev),
    ]  # fmt: skip


def run(opts: Options) -> list[Path]:
    """Produce Table 2's CSV/markdown and the memory-vs-batch CSV/figure; returns the paths."""
    t0 = time.perf_counter()
    env = capture_environment(opts.device, torch.float32)
    env = replace(env, dtype=opts.dtype_label)
    rows: list[ResultRow] = []
    for model, preset in tqdm(TABLE2_MODELS, desc="table 2", leave=False):
        rows += compute_rows(env, "table2", model, preset, opts)
        rows += gpu_rows(env, "table2", model, preset, opts)
        rows += quality_rows(env, "table2", model, checkpoint_reason(model), opts.batch)
    rows += ratio_rows(
        env, "table2",
        [(f"var-d{d}", f"var-d{d}", f"mvar-finetune-d{d}", f"mvar-d{d}") for d in DEPTHS], opts,
    )  # fmt: skip
    load = cpu_load()
    rows += tiny_rows(env, "table2", [TINY_FOR["var"], TINY_FOR["mvar"]], opts)
    rows += poster_rows(env, opts)
    out = opts.out
    csv_path = write_csv(rows, out / "table2.csv")
    md = write_markdown(
        csv_path, out / "table2.md",
        title="Table 2: pre-trained VAR vs fine-tuned MVAR† (batch 32)",
        sections=report_sections(rows, "table2")
        + [("Poster: d24 at batch 64 (MiB)", ["inference_memory", "inference_memory_ratio"],
            ["poster"])],
        notes=(*MEMORY_NOTES, load,
               f"Run time of this session: {time.perf_counter() - t0:.0f} s (figure not included)."),
    )  # fmt: skip
    paths = [csv_path, md]
    if opts.figure:
        fig_rows = memory_vs_batch_rows(env, opts)
        fig_csv = write_csv(fig_rows, out / "memory_vs_batch.csv")
        metric = "inference_memory_measured" if opts.on_gpu else "inference_memory"
        png = plot_memory_vs_batch(
            fig_csv, out / "figures" / "memory_vs_batch.png", metric=metric,
            title="Inference memory vs batch size (token generation, fp32, CFG; "
            + ("measured" if opts.on_gpu else "estimated") + ")",
            capacity_gib={"RTX 4090 (24 GiB)": 24.0},
        )  # fmt: skip
        paths += [fig_csv, png]
    log.info("table 2 done in %.0f s", time.perf_counter() - t0)
    return paths


def parse_args(argv: Sequence[str] | None = None) -> Options:
    return parse_options(argv, __doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in run(parse_args(argv)):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
