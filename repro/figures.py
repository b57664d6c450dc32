"""Figures, drawn only from the report CSVs (``nox -s repro_figures``), plus the picture pair.

* ``figures/memory_vs_batch.png``: inference memory vs batch (motivation figure, panel c) from
  ``memory_vs_batch.csv`` (written by ``repro.table2``);
* ``figures/attention_gflops.png``: attention GFLOPs per image, ours vs the paper, from
  ``table2.csv`` and ``ablation.csv``;
* ``figures/na2d_speed.png``: neighbourhood-attention backends relative to dense SDPA, from
  ``bench/na2d.csv`` (written by ``bench/bench_na2d.py`` + ``bench.to_csv``);
* ``figures/<model>_..._grid.png`` / ``..._progression.png``: a sample grid and the per-scale
  progression of a trained model, only when ``--ckpt`` (and ``--vae-ckpt``) are given: pictures
  of random weights would say nothing (the embedded study draws its own trained models' samples
  in ``reports/embedded/figures/``).

A CSV that is missing is reported with the session that produces it; nothing is invented.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from repro.report import plot_memory_vs_batch, read_csv, save_figure

logger = logging.getLogger(__name__)


def _missing(path: Path, producer: str) -> None:
    logger.warning("skipping the figure from %s: file missing (run %s first)", path, producer)


def plot_attention_gflops(csvs: Sequence[Path], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.concat([read_csv(p) for p in csvs])
    df = df[(df.metric == "attn_gflops") & (df.method == "counted") & (df.status == "ok")]
    df = df.drop_duplicates(subset=["model"])
    long = pd.concat(
        [
            df.assign(source="ours (counted)", gflops=df.value),
            df[df.paper_value.notna()].assign(source="paper", gflops=df.paper_value),
        ]
    )
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.barplot(data=long, y="model", x="gflops", hue="source", ax=ax, orient="h")
    ax.set_xlabel("attention-block GFLOPs per image (qkv + QKᵀ + AV MACs)")
    ax.set_ylabel("")
    ax.set_title("Attention compute, counted on the real models vs the paper")
    fig.tight_layout()
    return save_figure(fig, png)


def plot_na2d_speed(csv: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.read_csv(csv)
    df = df[(df.status == "ok") & df.ratio_vs_dense.notna()].copy()
    df["workload"] = df.apply(lambda r: f"B={r.B} {r.workload} {r['pass']}", axis=1)
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    sns.barplot(data=df, y="workload", x="ratio_vs_dense", hue="backend", ax=ax, orient="h")
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("speed vs dense SDPA + mask (>1 is faster; medians, one run)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylabel("")
    device = ", ".join(sorted(set(df.device.astype(str))))
    ax.set_title(f"2-D neighbourhood attention, k=7, 16 heads, D=64, fp32 ({device})")
    fig.tight_layout()
    return save_figure(fig, png)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports", help="the reports folder (CSVs in, figures/ out)")
    p.add_argument("--model", default="mvar-tiny", help="model for the sample pictures")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--vae-ckpt", default=None)
    p.add_argument("--classes", default="1,2,3,4")
    p.add_argument("--no-samples", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    figs = out / "figures"
    made: list[Path] = []
    mem = out / "memory_vs_batch.csv"
    if mem.is_file():
        made.append(plot_memory_vs_batch(mem, figs / "memory_vs_batch.png",
                                         capacity_gib={"RTX 4090 (24 GiB)": 24}))  # fmt: skip
    else:
        _missing(mem, "nox -s repro_table2")
    tables = [p for p in (out / "table2.csv", out / "ablation.csv") if p.is_file()]
    if tables:
        made.append(plot_attention_gflops(tables, figs / "attention_gflops.png"))
    else:
        _missing(out / "table2.csv", "nox -s repro_table2")
    bench = out / "bench" / "na2d.csv"
    if bench.is_file():
        made.append(plot_na2d_speed(bench, figs / "na2d_speed.png"))
    else:
        _missing(bench, "nox -s bench")
    if args.ckpt is None and not args.no_samples:
        logger.info("no --ckpt: no sample pictures (random weights would say nothing; trained "
                    "samples: reports/embedded/figures/)")  # fmt: skip
    elif not args.no_samples:
        from mvar import visualize

        argv_s = ["--model", args.model, "--classes", args.classes, "--out", str(figs)]
        argv_s += ["--ckpt", args.ckpt] if args.ckpt else []
        argv_s += ["--vae-ckpt", args.vae_ckpt] if args.vae_ckpt else []
        made += visualize.main(argv_s)
    for p in made:
        logger.info("wrote %s", p)
    return made


if __name__ == "__main__":
    main()
