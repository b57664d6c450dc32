"""The paper registry (``repro.paper``) and the report helpers (``repro.report``): long-format
CSV columns, paper-vs-ours markdown, plots drawn from CSV files, and the internal consistency
of the copied numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from repro import paper
from repro.report import (
    COLUMNS,
    Environment,
    capture_environment,
    make_row,
    markdown_table,
    not_measured,
    plot_memory_vs_batch,
    read_csv,
    write_csv,
    write_markdown,
)

ENV = Environment(device="cpu: test (2 cores)", dtype="float32", torch="2.x", git_sha="abc123")


# --- the paper's numbers --------------------------------------------------------------------


def test_registry_shapes_and_sources() -> None:
    assert len(paper.rows("table1")) == 22 * 6
    assert len(paper.rows("table2")) == 6 * 12
    assert len(paper.rows("ablation")) == 3 * 6
    assert all(pv.source for pv in paper.ALL)
    reproduced = {pv.model for pv in paper.rows("table1") if not pv.quoted}
    assert reproduced == {"var-d16", "mvar-scratch-d16"}  # scale-wise rows (docs/paper_numbers.md §2)
    assert all(pv.quoted for pv in paper.rows("table1") if pv.model not in reproduced)
    for pv in paper.ALL:
        if not pv.quoted:
            assert pv.model in paper.MODEL_PRESETS, pv
    with pytest.raises(KeyError, match="valid"):
        paper.rows("table3")


def test_registry_cells() -> None:
    assert paper.paper_value("table2", "var-d16", "kv_cache") == 5440
    assert paper.paper_value("table2", "mvar-finetune-d24", "attn_gflops") == 118.25
    assert paper.paper_value("ablation", "mvar-d16-scale-markov", "attn_gflops") == 37.84
    assert paper.paper_value("table1", "mvar-scratch-d16", "fid") == 3.09
    oom = paper.lookup("table2", "var-d24", "train_memory")
    assert oom is not None and oom.value is None and oom.note == "OOM"
    assert paper.lookup("table2", "var-d16", "nonexistent") is None


@pytest.mark.parametrize("d", [16, 20, 24])
def test_printed_ratios_follow_from_printed_cells(d: int) -> None:
    # A typo in a copied memory cell would break the paper's own "(2.8x)" ratios.
    v = paper.paper_value("table2", f"var-d{d}", "inference_memory")
    m = paper.paper_value("table2", f"mvar-finetune-d{d}", "inference_memory")
    r = paper.paper_value("table2", f"mvar-finetune-d{d}", "inference_memory_ratio")
    assert round(v / m, 1) == r
    if d < 24:
        sp = paper.paper_value("table2", f"mvar-finetune-d{d}", "train_speedup")
        vt = paper.paper_value("table2", f"var-d{d}", "train_step_time")
        mt = paper.paper_value("table2", f"mvar-finetune-d{d}", "train_step_time")
        assert round(vt / mt, 1) == sp


def test_poster_and_ablation_agree_with_table2() -> None:
    v = paper.paper_value("poster", "var-d24", "inference_memory")
    m = paper.paper_value("poster", "mvar-finetune-d24", "inference_memory")
    assert round(v / m, 1) == paper.paper_value(
        "poster", "mvar-finetune-d24", "inference_memory_ratio"
    )
    for metric in ("inference_memory", "attn_gflops"):
        assert paper.paper_value("ablation", "var-d16", metric) == paper.paper_value(
            "table2", "var-d16", metric
        )
    assert paper.paper_value("ablation", "mvar-d16", "inference_memory") == 3846


# --- rows and CSV ------------------------------------------------------------------------------


def test_make_row_fills_paper_value_and_unit() -> None:
    r = make_row(ENV, "table2", "var-d16", "kv_cache", 5440.0, method="counted", batch=32)
    assert (r.paper_value, r.unit, r.status, r.device) == (5440.0, "MiB", "ok", ENV.device)
    r2 = make_row(ENV, "ablation", "mvar-d16", "attn_gflops", 35.44, method="analytic",
                  device="none (closed form)")  # fmt: skip
    assert r2.paper_value == 35.44 and r2.device == "none (closed form)"
    with pytest.raises(ValueError, match="status"):
        make_row(ENV, "table2", "var-d16", "fid", None, method="none")
    with pytest.raises(ValueError, match="method"):
        make_row(ENV, "table2", "var-d16", "fid", 1.0, method="guessed")
    with pytest.raises(ValueError, match="non-finite"):
        make_row(ENV, "table2", "var-d16", "fid", math.nan, method="measured")


def test_csv_round_trip_has_exact_columns(tmp_path: Path) -> None:
    rows = [
        make_row(ENV, "table2", "var-d16", "attn_gflops", 43.6113, method="counted", batch=32),
        not_measured(ENV, "table2", "var-d16", "fid", "needs var_d16.pth", batch=32),
    ]
    path = write_csv(rows, tmp_path / "sub" / "t.csv")
    with path.open() as f:
        header = next(csv.reader(f))
    assert tuple(header) == COLUMNS == (
        "table", "model", "metric", "value", "unit", "paper_value", "method", "status",
        "device", "dtype", "batch", "torch", "git_sha", "backend",
    )  # fmt: skip
    df = read_csv(path)
    assert len(df) == 2
    assert df.loc[0, "value"] == pytest.approx(43.6113) and df.loc[0, "paper_value"] == 43.61
    assert (
        math.isnan(df.loc[1, "value"]) and df.loc[1, "status"] == "not measured: needs var_d16.pth"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("table,model\nx,y\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(bad)


def test_markdown_paper_vs_ours_ratio(tmp_path: Path) -> None:
    rows = [
        make_row(
            ENV, "table2", "var-d16", "inference_memory", 8000.0, method="estimated", batch=32
        ),
        make_row(ENV, "table2", "mvar-finetune-d16", "kv_cache", 0.0, method="counted", batch=32),
        not_measured(ENV, "table2", "var-d16", "fid", "needs var_d16.pth", batch=32),
    ]
    df = read_csv(write_csv(rows, tmp_path / "t.csv"))
    md = markdown_table(df)
    lines = md.strip().splitlines()
    assert (
        lines[0]
        == "| model | metric | unit | batch | paper | ours | ours/paper | method | status |"
    )
    assert "| var-d16 | inference_memory | MiB | 32 | 10882 | 8000 | 0.735 | estimated | ok |" in md
    assert "| mvar-finetune-d16 | kv_cache | MiB | 32 | 0 | 0 | – |" in md  # no ratio to 0
    assert (
        "| var-d16 | fid | – | 32 | 3.55 | – | – | none | not measured: needs var_d16.pth |" in md
    )
    out = write_markdown(tmp_path / "t.csv", tmp_path / "t.md", title="T",
                         sections=[("Memory", ["inference_memory"])], notes=["a note"])  # fmt: skip
    text = out.read_text()
    assert text.startswith("# T") and "## Memory" in text and "fid" not in text
    assert "git_sha: abc123" in text and "- a note" in text


def test_capture_environment_names_the_machine() -> None:
    env = capture_environment("cpu", torch.float32)
    assert env.device.startswith("cpu:") and env.dtype == "float32"
    assert env.torch == torch.__version__
    assert env.git_sha == "unknown" or len(env.git_sha.removesuffix("-dirty")) == 40


# --- plots from CSV files -------------------------------------------------------------------------


def test_memory_vs_batch_plot_from_csv(tmp_path: Path) -> None:
    rows = [
        make_row(ENV, "memory_vs_batch", m, "inference_memory", base + slope * b,
                 method="estimated", batch=b)
        for m, base, slope in (("var-d16", 1600, 200), ("mvar-d16", 1600, 40))
        for b in (1, 2, 4, 8)
    ]  # fmt: skip
    rows.append(
        not_measured(ENV, "memory_vs_batch", "var-d16", "inference_memory", "oom", batch=16)
    )
    csv_path = write_csv(rows, tmp_path / "m.csv")
    png = plot_memory_vs_batch(csv_path, tmp_path / "fig" / "m.png", capacity_gib={"24 GiB": 24})
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows"):
        plot_memory_vs_batch(csv_path, tmp_path / "x.png", metric="train_memory")
