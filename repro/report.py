"""Shared report helpers: environment capture, long-format CSV rows, paper-vs-ours markdown and
plots drawn from the CSV files only.

Every result is one row of the long format :data:`COLUMNS`; a row carries its environment
(device, dtype, batch, torch version, git SHA), how the number was obtained (``method``) and
whether there is a number at all (``status``). A cell that this machine cannot produce is a row
with ``value`` empty and ``status="not measured: <reason>"`` -- never an invented number.

``method`` vocabulary:

- ``measured``: timed or read from the device (CUDA allocator, NVML, wall clock).
- ``counted``: counted while running the real model (e.g. attention FLOPs through hooks, KV-cache
  bytes read from the sampler's tensors).
- ``analytic``: a closed form from the config.
- ``estimated``: a model of a measurement (e.g. live tensor bytes under ``FakeTensorMode``
  standing in for GPU memory).
- ``none``: no number (see ``status``).

Usage::

    env = capture_environment(torch.device("cpu"))
    rows = [make_row(env, "table2", "var-d16", "kv_cache", 5440.0, method="counted", batch=32)]
    write_csv(rows, "reports/table2.csv")
    print(markdown_table(read_csv("reports/table2.csv")))
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mvar.env import device_name, git_sha
from mvar.io import atomic_path, atomic_write
from repro import paper

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "table",
    "model",
    "metric",
    "value",
    "unit",
    "paper_value",
    "method",
    "status",
    "device",
    "dtype",
    "batch",
    "torch",
    "git_sha",
    "backend",
)
# Columns a reader may find missing in CSVs written before they existed (filled with "").
OPTIONAL_COLUMNS: tuple[str, ...] = ("backend",)
METHODS: tuple[str, ...] = ("measured", "counted", "analytic", "estimated", "none")


# --- environment -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Environment:
    """Where a number was produced: device name, dtype, torch version, git SHA."""

    device: str
    dtype: str
    torch: str
    git_sha: str


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def capture_environment(
    device: torch.device | str | None = None, dtype: torch.dtype | str = torch.float32
) -> Environment:
    """The environment columns for rows produced on ``device`` in ``dtype``."""
    dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return Environment(device_name(device), dt, torch.__version__, git_sha())


# --- rows ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultRow:
    """One long-format result row; field order = :data:`COLUMNS`."""

    table: str
    model: str
    metric: str
    value: float | None
    unit: str
    paper_value: float | None
    method: str
    status: str
    device: str
    dtype: str
    batch: int | None
    torch: str
    git_sha: str
    # The neighbourhood-attention backend that ran ("none": the model has no NA; "": the
    # number involves no model run, e.g. an analytic count or a paper value).
    backend: str = ""


assert tuple(f.name for f in fields(ResultRow)) == COLUMNS


def make_row(
    env: Environment,
    table: str,
    model: str,
    metric: str,
    value: float | None,
    *,
    method: str,
    unit: str | None = None,
    status: str = "ok",
    batch: int | None = None,
    paper_table: str | None = None,
    paper_value: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "",
) -> ResultRow:
    """A row; ``paper_value`` is looked up in :mod:`repro.paper` under ``paper_table`` (default
    ``table``) unless given, and ``unit`` defaults to the paper's unit of ``metric``.

    ``device``/``dtype`` override the environment's (e.g. an analytic count is device-free).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if value is None and status == "ok":
        raise ValueError(f"{table}/{model}/{metric}: a row without a value needs a status reason")
    if value is not None and not math.isfinite(float(value)):
        raise ValueError(f"{table}/{model}/{metric}: non-finite value {value!r}")
    if paper_value is None:
        paper_value = paper.paper_value(paper_table or table, model, metric)
    if unit is None:
        unit = paper.METRICS[metric][0] if metric in paper.METRICS else ""
    return ResultRow(
        table=table,
        model=model,
        metric=metric,
        value=None if value is None else float(value),
        unit=unit,
        paper_value=None if paper_value is None else float(paper_value),
        method=method,
        status=status,
        device=env.device if device is None else device,
        dtype=env.dtype if dtype is None else dtype,
        batch=batch,
        torch=env.torch,
        git_sha=env.git_sha,
        backend=backend,
    )


def not_measured(
    env: Environment,
    table: str,
    model: str,
    metric: str,
    reason: str,
    *,
    batch: int | None = None,
    unit: str | None = None,
    paper_table: str | None = None,
) -> ResultRow:
    """A row that says why there is no number (``status="not measured: <reason>"``)."""
    return make_row(
        env,
        table,
        model,
        metric,
        None,
        method="none",
        unit=unit,
        status=f"not measured: {reason}",
        batch=batch,
        paper_table=paper_table,
    )


def write_csv(rows: Iterable[ResultRow], path: str | Path) -> Path:
    """Write rows in the long format (parent folders created); returns the path."""
    path = Path(path)
    rows = list(rows)
    # Atomic: a session killed mid-write leaves the previous table, not half of a new one.
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    log.info("wrote %d rows to %s", len(rows), path)
    return path


def read_csv(path: str | Path):  # -> pandas.DataFrame (pandas imported lazily: optional dep)
    """Read a long-format CSV; raises if a column of :data:`COLUMNS` is missing."""
    import pandas as pd

    df = pd.read_csv(path, keep_default_na=True,
                     dtype={"status": str, "git_sha": str, "backend": str})  # fmt: skip
    for c in OPTIONAL_COLUMNS:
        if c not in df.columns:
            df[c] = ""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return df


# --- markdown --------------------------------------------------------------------------------
def _fmt(v: object) -> str:
    """Numbers as the paper prints them: integers >= 1000 (MiB), two decimals from 1 (GFLOPs,
    seconds, ratios), three significant digits below 1."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(df, *, columns: Sequence[str] = ("model", "metric", "unit", "batch")) -> str:
    """A "paper vs ours (ratio)" markdown table of a long-format frame (one line per row).

    ``ours/paper`` is given only when both numbers exist and the paper's is non-zero.
    """
    head = [*columns, "paper", "ours", "ours/paper", "method", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        pv, ov = r["paper_value"], r["value"]
        have = not (_isnan(pv) or _isnan(ov))
        ratio = f"{ov / pv:.3f}" if have and pv != 0 else "–"
        batch = r.get("batch")
        cells = [
            _fmt(int(batch)) if c == "batch" and not _isnan(batch) else _fmt(r[c]) for c in columns
        ]
        cells += [_fmt(pv), _fmt(ov), ratio, str(r["method"]), str(r["status"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _isnan(v: object) -> bool:
    if v is None:
        return True
    try:
        return math.isnan(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def environment_line(df) -> str:
    """One markdown line naming the environments present in a frame."""
    parts = []
    for key in ("device", "dtype", "torch", "git_sha"):
        vals = sorted({str(v) for v in df[key].dropna().unique()})
        parts.append(f"{key}: {', '.join(vals) if vals else '–'}")
    return "; ".join(parts)


Section = tuple[str, Sequence[str]] | tuple[str, Sequence[str], Sequence[str]]


def write_markdown(
    csv_path: str | Path,
    md_path: str | Path,
    *,
    title: str,
    notes: Sequence[str] = (),
    sections: Sequence[Section] | None = None,
) -> Path:
    """Render a long-format CSV as markdown: title, environment, sections, then notes.

    A section is ``(heading, metrics)`` or ``(heading, metrics, tables)``: the rows with those
    metrics (and tables), grouped by model in order of appearance, then in the order of
    ``metrics``. Everything comes from the CSV.
    """
    df = read_csv(csv_path)
    out = [f"# {title}", "", f"Source: `{Path(csv_path).name}`. {environment_line(df)}.", ""]
    if sections is None:
        sections = [("Results", list(dict.fromkeys(df["metric"])))]
    model_order = {m: i for i, m in enumerate(dict.fromkeys(df["model"]))}
    for section in sections:
        heading, metrics = section[0], list(section[1])
        part = df[df["metric"].isin(metrics)]
        if len(section) > 2:
            part = part[part["table"].isin(list(section[2]))]  # type: ignore[misc]
        if part.empty:
            continue
        key = part["model"].map(model_order) * 10_000 + part["metric"].map(metrics.index) * 10
        part = part.assign(_k=key.values).sort_values("_k", kind="stable").drop(columns="_k")
        out += [f"## {heading}", "", markdown_table(part), ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md_path = atomic_write(md_path, lambda tmp: tmp.write_text("\n".join(out)))
    log.info("wrote %s", md_path)
    return md_path


# --- plots (from CSV files only) -------------------------------------------------------------
def save_figure(fig: object, png_path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (150 dpi) and close it."""
    import matplotlib.pyplot as plt

    path = atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"))  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


def plot_memory_vs_batch(
    csv_path: str | Path,
    png_path: str | Path,
    *,
    metric: str = "inference_memory",
    title: str | None = None,
    capacity_gib: dict[str, float] | None = None,
) -> Path:
    """The motivation figure's panel c from a long-format CSV: batch (log2) on the y axis,
    memory (GiB) on the x axis, one line per model; VAR solid, MVAR dashed.

    Rows with ``metric`` and a value are drawn; ``capacity_gib`` adds labelled vertical lines
    (e.g. ``{"RTX 4090 (24 GiB)": 24}``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = read_csv(csv_path)
    df = df[(df["metric"] == metric) & df["value"].notna()].copy()
    if df.empty:
        raise ValueError(f"{csv_path}: no rows with metric {metric!r} and a value")
    df["memory_gib"] = df["value"] / 1024.0  # rows are MiB
    df["arch"] = df["model"].map(lambda m: "MVAR" if m.startswith("mvar") else "VAR")
    df["depth"] = df["model"].str.extract(r"d(\d+)")[0].map(lambda d: f"d{d}")
    methods = ", ".join(sorted(df["method"].unique()))

    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(8, 5.2))
    sns.lineplot(
        data=df,
        x="memory_gib",
        y="batch",
        hue="depth",
        style="arch",
        markers=True,
        dashes={"VAR": "", "MVAR": (4, 2)},
        orient="y",
        ax=ax,
        markersize=7,
        hue_order=sorted(df["depth"].unique(), key=lambda d: int(d[1:])),
        style_order=[a for a in ("VAR", "MVAR") if a in set(df["arch"])],
    )
    ax.set_yscale("log", base=2)
    batches = sorted(int(b) for b in df["batch"].unique())
    ax.set_yticks(batches, [str(b) for b in batches])
    ax.set_xscale("log", base=2)
    lo, hi = df["memory_gib"].min() / 2, df["memory_gib"].max() * 2
    xt = [2.0**k for k in range(-4, 14) if lo <= 2.0**k <= hi]
    ax.set_xticks(xt, [f"{x:g}" for x in xt])
    for label, gib in (capacity_gib or {}).items():
        ax.axvline(gib, color="0.3", lw=1, ls=":")
        ax.text(gib, batches[-1], f"{label} ", rotation=90, va="top", ha="right", fontsize=9,
                color="0.3", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85,
                                   "pad": 1.5})  # fmt: skip
    ax.set_xlabel("inference memory (GiB, log2)")
    ax.set_ylabel("batch size (log2)")
    ax.set_title(title or f"Inference memory vs batch size ({methods})")
    ax.legend(title=None, loc="upper left", ncols=2, fontsize=9, framealpha=0.9)
    fig.tight_layout()
    png_path = save_figure(fig, png_path)
    log.info("wrote %s", png_path)
    return png_path
