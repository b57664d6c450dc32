"""The paper's numbers as data, each with the place it was copied from.

One registry for every number the harness compares against: Table 1 (the two scale-wise rows
that are reproduced, plus the quoted rows of other model families, marked ``quoted=True``),
Table 2 (pre-trained VAR vs fine-tuned MVAR†), the progressive ablation and the poster — the
numbers a report reads. Values are transcribed from the paper's tables and poster; each
source is listed in ``docs/paper_numbers.md``.

Naming, shared by every report:

- ``table``: ``"table1"``, ``"table2"``, ``"ablation"``, ``"poster"``.
- ``model``: the released checkpoint name where the row is about weights (``var-d16``,
  ``mvar-finetune-d16`` = MVAR-d16† of Table 2, ``mvar-scratch-d16`` = MVAR-d16 trained from
  scratch, file ``mvar-d16.pth``), the architecture preset where it is about an architecture
  (the ablation: ``var-d16`` (a), ``mvar-d16-scale-markov`` (b), ``mvar-d16`` (c)); other
  families keep the paper's label.
  :data:`MODEL_PRESETS` maps each of ours to the architecture preset of ``mvar.config``.
- ``metric``/``unit``: see :data:`METRICS`.

Usage::

    from repro.paper import paper_value, rows
    paper_value("table2", "var-d16", "kv_cache")          # 5440.0 (MiB)
    [r for r in rows("table1") if not r.quoted]           # the reproduced rows
"""

from __future__ import annotations

from dataclasses import dataclass

from mvar.config import CHECKPOINT_PRESETS

# Where each block of numbers comes from (arXiv 2505.12742 v3 / ICLR 2026 camera-ready; the
# ICLR 2026 poster).
SRC_TABLE1 = "MVAR paper, Table 1 (ImageNet 256x256 class-conditional); docs/paper_numbers.md §2"
SRC_TABLE2 = (
    "MVAR paper, Table 2 (pre-trained VAR vs fine-tuned MVAR†, RTX 4090, batch 32); "
    "docs/paper_numbers.md §3"
)
SRC_ABLATION = "MVAR paper, progressive ablation figure (d16, batch 32); docs/paper_numbers.md §4"
SRC_POSTER = "MVAR ICLR 2026 poster (d24, batch 64); docs/paper_numbers.md §5"

# metric -> (unit, meaning). Memory cells in the paper are printed as "10882M"; the KV-cache
# cells equal the exact MiB count (2·layers·680·C·64·4 bytes / 2**20, docs/counting.md §5),
# so every memory cell is read as MiB.
METRICS: dict[str, tuple[str, str]] = {
    "fid": ("", "FID-50k vs ImageNet-train statistics (lower is better)"),
    "is": ("", "Inception score, 10 splits"),
    "precision": ("", "improved precision, k=3"),
    "recall": ("", "improved recall, k=3"),
    "sfid": ("", "sFID (mixed_6/conv features)"),
    "params": ("M", "parameters, millions"),
    "steps": ("", "sampling steps"),
    "sample_time": ("s", "inference seconds per batch"),
    "attn_gflops": ("GFLOPs", "attention-block multiply-accumulates per image, conditional branch"),
    "kv_cache": ("MiB", "KV cache at the end of sampling, CFG batch, fp32"),
    "inference_memory": ("MiB", "peak inference memory of a sampling batch"),
    "inference_memory_ratio": ("x", "VAR inference memory / MVAR inference memory, same depth"),
    "train_step_time": ("s", "seconds per training iteration"),
    "train_speedup": ("x", "VAR train s/it / MVAR train s/it, same depth"),
    "train_memory": ("MiB", "peak training memory"),
}

# Architecture preset (mvar.config) of every non-quoted model name used here: a released
# checkpoint maps to its architecture, an architecture (the ablation's rows) to itself.
MODEL_PRESETS: dict[str, str] = {
    **CHECKPOINT_PRESETS,
    **{m: m for m in ("var-d16", "mvar-d16-scale-markov", "mvar-d16")},
}


@dataclass(frozen=True)
class PaperValue:
    """One number as printed by the paper (``value=None`` for "–" or "OOM"; see ``note``)."""

    table: str
    model: str
    metric: str
    value: float | None
    unit: str
    source: str
    batch: int | None = None
    quoted: bool = False  # True: another family's row, quoted and never reproduced
    note: str = ""


def _unit(metric: str) -> str:
    return METRICS[metric][0]


def _row_block(
    table: str,
    source: str,
    metrics: tuple[str, ...],
    data: dict[str, tuple[float | str | None, ...]],
    *,
    batch: int | None = None,
    quoted_models: frozenset[str] | None = None,
) -> list[PaperValue]:
    out: list[PaperValue] = []
    for model, values in data.items():
        if len(values) != len(metrics):
            raise ValueError(f"{table}/{model}: {len(values)} values for {len(metrics)} metrics")
        quoted = quoted_models is not None and model in quoted_models
        for metric, v in zip(metrics, values):
            note = ""
            if isinstance(v, str):  # "OOM", "–": kept as a note, no number
                note, v = v, None
            out.append(
                PaperValue(table, model, metric, v, _unit(metric), source, batch, quoted, note)
            )
    return out


# --- Table 1 -------------------------------------------------------------------------------
# (FID, IS, Pre, Rec, params in M, steps). None = "–" in the paper. Only the two scale-wise
# rows are reproduced; all others are quoted (docs/paper_numbers.md §2).
_T1_METRICS = ("fid", "is", "precision", "recall", "params", "steps")
_T1: dict[str, tuple[float | str | None, ...]] = {
    "BigGAN": (6.95, 224.5, 0.89, 0.38, 112, 1),
    "GigaGAN": (3.45, 225.5, 0.84, 0.61, 569, 1),
    "StyleGAN-XL": (2.30, 265.1, 0.78, 0.53, 166, 1),
    "ADM": (10.94, 101.0, 0.69, 0.63, 554, 250),
    "CDM": (4.88, 158.7, None, None, None, 8100),
    "LDM-4-G": (3.60, 247.7, None, None, 400, 250),
    "Simple-Diffusion": (2.44, 256.3, None, None, 2000, None),
    "DiT-L/2": (5.02, 167.2, 0.75, 0.57, 458, 250),
    "DiT-XL/2": (2.27, 278.2, 0.83, 0.57, 675, 250),
    "MaskGIT": (6.18, 182.1, 0.80, 0.51, 227, 8),
    "RCG (cond.)": (3.49, 215.5, None, None, 502, 20),
    "VQVAE-2†": (31.11, "~45", 0.36, 0.57, 13500, 5120),  # IS printed as "~45"
    "VQGAN†": (18.65, 80.4, 0.78, 0.26, 227, 256),
    "VQGAN": (15.78, 74.3, None, None, 1400, 256),
    "VQGAN-re": (5.20, 280.3, None, None, 1400, 256),
    "ViTVQ": (4.17, 175.1, None, None, 1700, 1024),
    "ViTVQ-re": (3.04, 227.4, None, None, 1700, 1024),
    "DART-AR": (3.98, 256.8, None, None, 812, None),
    "RQTran.": (7.55, 134.0, None, None, 3800, 68),
    "RQTran.-re": (3.80, 323.7, None, None, 3800, 68),
    "var-d16": (3.55, 280.4, 0.84, 0.51, 310, 10),  # official weights
    "mvar-scratch-d16": (3.09, 285.5, 0.85, 0.51, 310, 10),  # trained from scratch
}
T1_FAMILY: dict[str, str] = {
    **{m: "GAN" for m in ("BigGAN", "GigaGAN", "StyleGAN-XL")},
    **{m: "DM" for m in ("ADM", "CDM", "LDM-4-G", "Simple-Diffusion", "DiT-L/2", "DiT-XL/2")},
    **{
        m: "token AR"
        for m in (
            "MaskGIT",
            "RCG (cond.)",
            "VQVAE-2†",
            "VQGAN†",
            "VQGAN",
            "VQGAN-re",
            "ViTVQ",
            "ViTVQ-re",
            "DART-AR",
            "RQTran.",
            "RQTran.-re",
        )
    },
    "var-d16": "scale AR",
    "mvar-scratch-d16": "scale AR",
}
TABLE1: list[PaperValue] = _row_block(
    "table1",
    SRC_TABLE1,
    _T1_METRICS,
    _T1,
    quoted_models=frozenset(m for m in _T1 if T1_FAMILY[m] != "scale AR"),
)

# --- Table 2 -------------------------------------------------------------------------------
_T2_METRICS = (
    "sample_time",
    "attn_gflops",
    "kv_cache",
    "inference_memory",
    "inference_memory_ratio",
    "train_step_time",
    "train_speedup",
    "train_memory",
    "fid",
    "is",
    "precision",
    "recall",
)
_T2: dict[str, tuple[float | str | None, ...]] = {
    "var-d16": (0.34, 43.61, 5440, 10882, None, 0.99, None, 34319, 3.55, 280.4, 0.84, 0.51),
    "mvar-finetune-d16": (0.27, 35.44, 0, 3846, 2.8, 0.61, 1.6, 20676, 3.40, 297.2, 0.86, 0.48),
    "var-d20": (0.52, 81.52, 8500, 16244, None, 1.35, None, 48173, 2.95, 302.6, 0.83, 0.56),
    "mvar-finetune-d20": (0.45, 68.75, 0, 5432, 3.0, 0.79, 1.7, 27665, 2.87, 295.3, 0.86, 0.52),
    "var-d24": (0.81, 136.63, 12240, 23056, None, "–", None, "OOM", 2.33, 312.9, 0.82, 0.59),
    "mvar-finetune-d24": (0.71, 118.25, 0, 7216, 3.2, 0.91, None, 38579, 2.23, 300.1, 0.85, 0.56),
}
TABLE2: list[PaperValue] = _row_block("table2", SRC_TABLE2, _T2_METRICS, _T2, batch=32)

# --- Ablation (d16, batch 32) ----------------------------------------------------------------
_ABL_METRICS = ("inference_memory", "fid", "is", "precision", "recall", "attn_gflops")
_ABL: dict[str, tuple[float | str | None, ...]] = {
    "var-d16": (10882, 4.84, 227.1, 0.85, 0.43, 43.61),  # (a) vanilla next-scale prediction
    "mvar-d16-scale-markov": (4199, 4.35, 240.6, 0.86, 0.45, 37.84),  # (b) + scale-Markov
    "mvar-d16": (3846, 4.16, 240.8, 0.85, 0.45, 35.44),  # (c) + spatial-Markov attention
}
ABLATION_LABELS: dict[str, str] = {
    "var-d16": "(a) vanilla next-scale prediction (VAR)",
    "mvar-d16-scale-markov": "(b) + scale-Markov prediction",
    "mvar-d16": "(c) + spatial-Markov attention (MVAR)",
}
ABLATION: list[PaperValue] = _row_block("ablation", SRC_ABLATION, _ABL_METRICS, _ABL, batch=32)

# --- Poster (d24, batch 64) ------------------------------------------------------------------
POSTER: list[PaperValue] = [
    PaperValue("poster", "mvar-finetune-d24", "inference_memory", 9860, "MiB", SRC_POSTER, 64),
    PaperValue("poster", "var-d24", "inference_memory", 40971, "MiB", SRC_POSTER, 64),
    PaperValue("poster", "mvar-finetune-d24", "inference_memory_ratio", 4.2, "x", SRC_POSTER, 64),
]

ALL: list[PaperValue] = [*TABLE1, *TABLE2, *ABLATION, *POSTER]
TABLES: tuple[str, ...] = ("table1", "table2", "ablation", "poster")

_INDEX: dict[tuple[str, str, str], PaperValue] = {}
for _pv in ALL:
    _key = (_pv.table, _pv.model, _pv.metric)
    if _key in _INDEX:
        raise RuntimeError(f"duplicate paper value {_key}")
    _INDEX[_key] = _pv


def rows(table: str) -> list[PaperValue]:
    """Every paper value of one table (raises for an unknown table name)."""
    if table not in TABLES:
        raise KeyError(f"unknown paper table {table!r}; valid: {', '.join(TABLES)}")
    return [pv for pv in ALL if pv.table == table]


def lookup(table: str, model: str, metric: str) -> PaperValue | None:
    """The :class:`PaperValue` of one cell, or None when the paper has no such cell."""
    return _INDEX.get((table, model, metric))


def paper_value(table: str, model: str, metric: str) -> float | None:
    """The printed number of one cell; None when absent, "–" or "OOM"."""
    pv = lookup(table, model, metric)
    return None if pv is None else pv.value
