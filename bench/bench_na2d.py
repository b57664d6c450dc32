"""Neighbourhood-attention backends side by side at MVAR's workloads.

Run (results go to ``reports/bench/``; the CSV has one row per backend x workload x pass, with
``status`` saying why a cell has no number):

    mkdir -p reports/bench
    pytest bench/bench_na2d.py --benchmark-json reports/bench/na2d.json
    python -m bench.to_csv reports/bench/na2d.json reports/bench/na2d.csv

Workloads: B in {2, 64} (B = 2 is one image with classifier-free guidance), 16 heads, D = 64,
grids 13x13 and 16x16 (MVAR's scales 8 and 9, docs/mvar.md §2), k = 7, fp32; passes ``fwd``
(under ``torch.no_grad``, as in sampling) and ``fwd+bwd`` (forward, then ``autograd.grad`` of
all three inputs, as in training). Each benchmark group (``<pass> B=<B> <H>x<W>``) holds every
backend, so pytest-benchmark prints them side by side and the CSV's ``ratio_vs_dense`` is
dense's median over the backend's (> 1: faster than dense).

Backends: ``dense``, ``numba``, ``flex``, ``cuda``, ``reference`` and, when importable,
``natten`` (natten.na2d on its own layout [B, H, W, heads, D]). Cells a backend cannot run are
recorded with the reason (no backward on CPU, no GPU, not installed, too much memory).

Threads: torch and numba both get ``NA2D_BENCH_THREADS`` threads (default: all CPUs), recorded
in every row; on a GPU, each timed call ends with ``torch.cuda.synchronize()``. Compilation
(numba's first call, FlexAttention's block mask) happens before the warm-up rounds, not in the
timing.

FLOPs (``extra_info["flops"]``, from a written formula): a forward does two matrix products
over each query's window, 2 * 2 * B * heads * H*W * kh*kw * D; a backward is counted as 2.5x a
forward (FlashAttention's convention: dV, dP, dQ, dK), so fwd+bwd = 3.5x. ``dense`` computes
the full N x N products (N = H*W) but is credited with the same useful FLOPs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mvar.attention import backend_unavailable_reason, na2d

THREADS = int(os.environ.get("NA2D_BENCH_THREADS", os.cpu_count() or 1))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, D, K = 16, 64, 7  # MVAR d16: 16 heads of 64; kernel 7 (docs/mvar.md §2)
WORKLOADS = [(B, n) for B in (2, 64) for n in (13, 16)]
BACKENDS = ("dense", "numba", "flex", "cuda", "reference", "natten")
PASSES = ("fwd", "fwd+bwd")
REFERENCE_MAX_BYTES = 1 << 30  # the reference materialises [B, heads, N, k*k, D] twice


def _set_threads() -> int | None:
    torch.set_num_threads(THREADS)
    try:
        import numba
    except ImportError:
        return None
    n = min(THREADS, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n


NUMBA_THREADS = _set_threads()


def _flops(B: int, n: int, pass_: str) -> int:
    fwd = 2 * 2 * B * HEADS * n * n * K * K * D
    return int(fwd * (3.5 if pass_ == "fwd+bwd" else 1.0))


def _natten_reason(pass_: str) -> str | None:
    try:
        import natten  # noqa: F401
    except ImportError as exc:
        return f"natten is not installed ({exc}); since 0.20 it has no CPU kernels anyway"
    if DEVICE.type == "cpu" and pass_ == "fwd+bwd":
        return "natten on CPU runs eager FlexAttention, which has no backward on CPU"
    return None


def _skip_reason(backend: str, B: int, n: int, pass_: str) -> str | None:
    if backend == "natten":
        return _natten_reason(pass_)
    reason = backend_unavailable_reason(
        backend, DEVICE, torch.float32, requires_grad=(pass_ == "fwd+bwd")
    )
    if reason is not None:
        return reason
    if backend == "reference":
        need = 2 * B * HEADS * n * n * K * K * D * 4
        if need > REFERENCE_MAX_BYTES:
            return (
                f"the reference (the tests' oracle) gathers {need / 2**30:.1f} GiB of windows "
                f"here, over the {REFERENCE_MAX_BYTES / 2**30:.0f} GiB cap for this benchmark"
            )
    return None


def _runner(backend: str, B: int, n: int, pass_: str) -> Callable[[], Any]:
    gen = torch.Generator().manual_seed(0)
    shape = (B, n, n, HEADS, D) if backend == "natten" else (B, HEADS, n, n, D)
    q, k, v, g = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(4))
    scale = 1.0  # MVAR's call (pre-normalised, pre-scaled q and k)
    if backend == "natten":
        import natten

        def attend(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return natten.na2d(a, b, c, kernel_size=K, scale=scale)

    else:

        def attend(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return na2d(a, b, c, K, scale=scale, backend=backend)

    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    if pass_ == "fwd":

        def run() -> None:
            with torch.no_grad():
                attend(q, k, v)
            sync()

    else:
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def run() -> None:
            out = attend(*leaves)
            torch.autograd.grad(out, leaves, g)
            sync()

    return run


# Decorator order: pytest varies the top parametrize fastest, so every backend of one workload
# and pass is timed back to back (ratios taken minutes apart would mix in the machine's drift).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize(("B", "n"), WORKLOADS, ids=[f"B{B}-{n}x{n}" for B, n in WORKLOADS])
def test_na2d(benchmark, record_skip, backend: str, B: int, n: int, pass_: str) -> None:
    info = {
        "backend": backend,
        "workload": f"{n}x{n}",
        "B": B,
        "heads": HEADS,
        "H": n,
        "W": n,
        "D": D,
        "k": K,
        "pass": pass_,
        "dtype": "float32",
        "device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": NUMBA_THREADS,
        "flops": _flops(B, n, pass_),
    }
    benchmark.group = f"{pass_} B={B} {n}x{n}"
    benchmark.extra_info.update(info)
    reason = _skip_reason(backend, B, n, pass_)
    if reason is not None:
        record_skip(info, reason)
    run = _runner(backend, B, n, pass_)
    try:
        run()  # compile / build caches outside the timing (pedantic adds a warm-up too)
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        record_skip(info, f"out of memory: {exc}", status="oom")
    # Steady state, as in a sampling or training loop. In a fresh process on the 2-core CI
    # machine the first ~10 numba forwards at B = 64 took ~120 ms and later ones ~50 ms; with
    # a preallocated output there was no such ramp, so it is the first touch of freshly mapped
    # memory (a 67 MB output per call), not the kernel. Every backend gets the same warm-up,
    # recorded in the row.
    rounds, warmup = (15, 10) if B >= 64 else (30, 10)
    benchmark.extra_info["warmup_rounds"] = warmup
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
