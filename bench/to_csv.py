"""pytest-benchmark JSON -> long-format CSV (one row per benchmark, plots are drawn from these).

    python -m bench.to_csv reports/bench/na2d.json reports/bench/na2d.csv

Each row holds the benchmark's ``extra_info`` (its parameters), ``median_s`` (and ``min_s``,
``rounds``; per iteration when ``extra_info`` has ``iterations_per_round``), a ``status``
(``ok``, ``oom`` or ``skipped: <reason>``; the skipped cells come from the JSON's ``"skipped"``
list that ``bench/conftest.py`` writes) and the environment (``device``, ``torch``,
``git_sha``). Ratios measured in the same run, each the median of the baseline row with the
same other parameters divided by this row's median (> 1: faster than the baseline; empty when
either is missing), for rows that carry the column (``RATIOS``): ``ratio_vs_dense`` (column
``backend``, baseline ``dense``), ``ratio_vs_fp32`` (``dtype``, baseline ``fp32``) and
``ratio_vs_kv_alive`` (``kv_cache``, baseline ``alive``: the decode with the KV cache freed vs
still alive) and ``ratio_vs_contiguous`` (``layout``, baseline ``contiguous``: channels-last).

Column order: the neighbourhood-attention columns first (``backend, workload, B, heads, H, W,
D, k, pass``), then the sampling ones (``model, phase, dtype, layout, kv_cache``),
``median_s``, the ratios, ``peak_mib, status, device, torch, git_sha`` where present, then any
other parameter in alphabetical order.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

from mvar.io import atomic_path

logger = logging.getLogger(__name__)

# (column, baseline value, ratio column): see the module docstring.
RATIOS = (
    ("backend", "dense", "ratio_vs_dense"),
    ("dtype", "fp32", "ratio_vs_fp32"),
    ("kv_cache", "alive", "ratio_vs_kv_alive"),
    ("layout", "contiguous", "ratio_vs_contiguous"),
    ("impl", "out_of_place", "ratio_vs_out_of_place"),
)
LEADING_COLUMNS = (
    "backend", "workload", "B", "heads", "H", "W", "D", "k", "pass",
    "model", "phase", "dtype", "layout", "impl", "kv_cache",
    "median_s", *(r[2] for r in RATIOS), "peak_mib", "status", "device", "torch", "git_sha",
)  # fmt: skip
# Measurements and bookkeeping: they differ between the rows of one comparison, so they are not
# part of its key (the compared column itself is left out too).
_NOT_KEY = {
    "median_s", "min_s", "rounds", "status", "test", "flops", "peak_mib", "peak_note", "na_calls",
    "kv_cache_bytes", "max_abs_diff_vs_contiguous", "bitwise_equal_to_in_place", *(r[2] for r in RATIOS),
}  # fmt: skip


def rows_from_benchmark_json(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The long-format rows of one pytest-benchmark JSON document (see the module docstring)."""
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    env = {
        "torch": machine.get("torch", ""),
        "git_sha": machine.get("git_sha")
        or (commit.get("id", "") + ("-dirty" if commit.get("dirty") else "")),
        "device": machine.get("cuda_device") or "cpu",
    }
    rows: list[dict[str, Any]] = []
    for bench in data.get("benchmarks", []):
        row = {**env, **bench.get("extra_info", {})}
        # A round may run several iterations (a whole training-schedule cycle): per iteration.
        per = int(row.get("iterations_per_round", 1))
        row["median_s"] = bench["stats"]["median"] / per
        row["min_s"] = bench["stats"]["min"] / per if "min" in bench["stats"] else ""
        row["rounds"] = bench["stats"].get("rounds", "")
        row["status"] = "ok"
        row["test"] = bench.get("fullname", bench.get("name", ""))
        rows.append(row)
    for skipped in data.get("skipped", []):
        rows.append({**env, **skipped, "median_s": ""})
    rows += end_to_end_rows(rows)
    for column, baseline, ratio in RATIOS:
        _add_ratio(rows, column, baseline, ratio)
    return rows


def end_to_end_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sampling suite: per token-generation row, the end-to-end time = its median + the median of
    the decode row of the model's VQ-VAE (same B and dtype, default layout), both measured in
    this run. Marked ``derived`` in ``status_note``; the ratios then apply to these rows too."""
    decode = {
        (m, r["B"], r["dtype"]): r["median_s"]
        for r in rows
        if r.get("phase") == "decode" and r.get("status") == "ok" and r.get("layout") == "contiguous"
        for m in str(r.get("used_by", "")).split()
    }
    out = []
    for r in rows:
        if r.get("phase") != "tokens" or r.get("status") != "ok":
            continue
        dec = decode.get((r["model"], r["B"], r["dtype"]))
        if dec is None:
            continue
        keep = {k: v for k, v in r.items() if k not in _NOT_KEY or k == "status"}
        out.append({**keep, "phase": "end_to_end", "median_s": r["median_s"] + dec, "test": "",
                    "status_note": "derived: tokens median + decode median, same run"})  # fmt: skip
    return out


def _add_ratio(rows: list[dict[str, Any]], column: str, baseline: str, ratio: str) -> None:
    def key(row: dict[str, Any]) -> tuple:
        return tuple(
            sorted((k, str(v)) for k, v in row.items() if k not in _NOT_KEY and k != column)
        )

    base_median = {
        key(r): r["median_s"] for r in rows if r.get(column) == baseline and r.get("status") == "ok"
    }
    for row in rows:
        if column not in row:
            continue
        base = base_median.get(key(row))
        ok = row.get("status") == "ok" and base and row["median_s"]
        row[ratio] = round(base / row["median_s"], 4) if ok else ""


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    present = {k for row in rows for k in row}
    columns = [c for c in LEADING_COLUMNS if c in present]
    columns += sorted(present - set(columns))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("csv", type=Path, help="long-format CSV to write")
    args = parser.parse_args(argv)
    rows = rows_from_benchmark_json(json.loads(args.json.read_text()))
    if not rows:
        raise SystemExit(f"{args.json}: no benchmarks and no skipped cells; nothing to write")
    write_csv(rows, args.csv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("wrote %d rows to %s", len(rows), args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
