"""The numba backend: fused CPU kernels for the forward and the backward pass.

Forward: one parallel loop over the B*heads*H query rows (``prange``). A row's W queries are
done in three passes, each with an L1-sized working set (``_query_row_forward``): the scores one
key row at a time into per-thread scratch rows, the softmax of each query's kh*kw scores, then
the weighted sum of values one value row at a time straight into the output row. The logsumexp
of each query is kept for the backward (FlashAttention's trick: the backward recomputes the
probabilities as exp(s - lse) instead of storing the [N, kh*kw] matrix).

Backward: one parallel loop over B*heads. Each (batch, head) slice is owned by one thread, so
dq, dk and dv are accumulated without atomics (MVAR's workloads have B*heads >= 32, which keeps
two to a few dozen cores busy). Within a slice it walks the query rows like the forward, one
key row at a time: s = scale*q.k and dp = do.v are recomputed once per (query, key) pair,
dq is a weighted sum of key rows, and dk, dv of a key are gathered over the queries of the row
whose windows hold it (``inverse_windows``), one accumulation per key and query row.

Memory layout: [B*heads, H, W, D] C-contiguous, so every inner loop runs over D on contiguous
memory and the kw keys of one window row are adjacent. fp16/bf16 inputs are converted to fp32
outside the kernels (cheap next to the kernel), fp64 runs in fp64; results are returned in the
input dtype. Why bf16 (what CPU autocast hands us) is upcast rather than computed natively:
numpy, hence numba, has no bfloat16 type at all, and numba's CPU fp16 arithmetic is scalar
conversions around fp32 anyway; the softmax and the weighted sum must accumulate in fp32 to
stay within the bf16 row of ``TOLERANCES``; and the conversion is one elementwise pass over
q, k, v (O(N·D)) against the kernel's O(N·kh·kw·D).

Floating-point flags: ``fastmath={"reassoc", "contract"}`` only. Reassociation lets LLVM
vectorise the length-D dot products (a strict left-to-right sum is one dependent add chain,
several times slower) and contract allows FMAs; both change results at the level of rounding
only. The flags that would change semantics (nnan, ninf, nsz, arcp, afn) stay off, so inf/NaN
propagate; fp32 uses its own vectorisable exp (see ``_exp_f32``, 1.3 ulp), fp64 libm's.

Speed: see ``bench/bench_na2d.py`` and ``reports/bench/na2d.csv`` for the measured ratios to
``dense`` (SDPA with a mask, which does 5.2x the FLOPs at 16x16, k = 7, but at GEMM speed). The
kernel is bound by instruction count, not memory: with D = 64 each dot product pays a
horizontal reduction about as long as its multiply-adds, which is why the kw = 7, D = 64
literal copy (see the comment above ``_key_row_dots``) pays off.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from mvar.attention._common import (
    FusedNA2D,
    compute_dtype,
    inverse_windows,
    window_start_array,
)

logger = logging.getLogger(__name__)

try:
    import numba
    from numba import njit, prange

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # the 'kernels' extra is not installed
    numba = None  # type: ignore[assignment]
    _IMPORT_ERROR = (
        f"numba is not importable ({exc}); install it with `pip install 'mvar[kernels]'`"
    )

_FASTMATH = {"reassoc", "contract"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(
    device: torch.device, dtype: torch.dtype | None = None, requires_grad: bool = False
) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cpu":
        return f"the numba backend runs on CPU tensors only, got device {device}"
    if dtype is not None and dtype not in _DTYPES:
        return f"the numba backend takes {_DTYPES}, got {dtype}"
    return None


# --------------------------------------------------------------------------------------------
# exp for the softmax. The kernels spend a fifth of their time in libm's scalar expf when it is
# called 49 times per query, so fp32 uses an inlinable exp that LLVM vectorises: Cody-Waite range
# reduction x = n*ln2 + r with |r| <= ln2/2, a degree-7 Taylor polynomial for e^r (truncation
# error r^8/8! < 6e-9, below half an fp32 ulp), and 2^n put straight into the exponent bits.
# Measured max error 1.3 ulp over [-87, 0]. It is compiled without fastmath so LLVM cannot fold
# the two-constant reduction back into one rounded ln2. Arguments are <= 0 here (scores minus
# their max, or minus the logsumexp); below -87.33 (where 2^n would leave the normal range) the
# argument is clamped, which changes probabilities smaller than 1.2e-38 only. NaN propagates.
# fp64 (used by the gradient checks) keeps math.exp.
# --------------------------------------------------------------------------------------------

_F32 = np.float32
_LOG2E = _F32(1.0 / math.log(2.0))
_LN2_HI = _F32(0.693359375)  # 355/512: n * _LN2_HI is exact in fp32 for |n| < 2^15
_LN2_LO = _F32(math.log(2.0) - 0.693359375)
_EXP_MIN = _F32(-87.33)  # floor(-87.33 * log2(e) + 0.5) = -126, the smallest normal exponent
_ONE = _F32(1.0)
_HALF = _F32(0.5)  # round-to-nearest offset for n
_C2, _C3, _C4, _C5, _C6, _C7 = (_F32(1.0 / math.factorial(n)) for n in range(2, 8))


def _exp_f32(x):
    x = _EXP_MIN if x < _EXP_MIN else x  # noqa: FURB136  (not max(): NaN must fall through)
    n = np.floor(x * _LOG2E + _HALF)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
    two_n = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * two_n


def _softmax_exp(x):
    """exp for the kernels: dispatched on the argument's type at compile time."""
    return math.exp(x)


# --------------------------------------------------------------------------------------------
# Kernels. Arrays are [BH, H, W, D] (lse: [BH, H, W]) and C-contiguous; row_start / col_start
# hold the clamp-rule window starts per query row / column (``window_start_array``); the window
# of query (i, j) is rows r0 = row_start[i] .. r0+kh-1, columns c0 = col_start[j] .. c0+kw-1,
# and slot t = a*kw + b of a query's scratch row holds key (r0 + a, c0 + b). Scalars take the
# arrays' dtype through ``q.dtype.type`` so fp32 kernels never widen to fp64.
#
# Habits that keep the loops fast:
# - Arrays are indexed with all four indices instead of through per-key views (a view costs a
#   reference-count increment and decrement inside the parallel region).
# - Keys are taken several at a time along a window row (7, 4, 3, 2, 1), so one pass over D
#   serves several dot products, or one read-modify-write of an accumulator row serves several
#   weighted value rows (the accumulation is otherwise bound by store-to-load forwarding).
# - The helpers take kw and D as arguments and are inlined (``inline="always"``); the kernels
#   call them once with the literals kw = 7, D = 64 (every MVAR preset: 64-wide heads, kernel
#   7) and once with the runtime values. In the literal copy LLVM sees constant trip counts,
#   unrolls the D loops completely and drops the remainder loops. Other shapes run the generic
#   copy; the property tests draw D and k freely for it and pin kw = 7, D = 64 for the other.
# --------------------------------------------------------------------------------------------


def _key_row_dots(x, bh, i, j, y, r, c0, kw, D, scale, s, u, t):
    """s[u, t + b] = scale * x[bh, i, j] . y[bh, r, c0 + b] for b < kw: one window row."""
    zero = x.dtype.type(0.0)
    b = 0
    while b + 4 <= kw:
        c = c0 + b
        s0 = zero
        s1 = zero
        s2 = zero
        s3 = zero
        for d in range(D):
            e = x[bh, i, j, d]
            s0 += e * y[bh, r, c, d]
            s1 += e * y[bh, r, c + 1, d]
            s2 += e * y[bh, r, c + 2, d]
            s3 += e * y[bh, r, c + 3, d]
        s[u, t + b] = s0 * scale
        s[u, t + b + 1] = s1 * scale
        s[u, t + b + 2] = s2 * scale
        s[u, t + b + 3] = s3 * scale
        b += 4
    if b + 3 <= kw:
        c = c0 + b
        s0 = zero
        s1 = zero
        s2 = zero
        for d in range(D):
            e = x[bh, i, j, d]
            s0 += e * y[bh, r, c, d]
            s1 += e * y[bh, r, c + 1, d]
            s2 += e * y[bh, r, c + 2, d]
        s[u, t + b] = s0 * scale
        s[u, t + b + 1] = s1 * scale
        s[u, t + b + 2] = s2 * scale
    elif b + 2 <= kw:
        c = c0 + b
        s0 = zero
        s1 = zero
        for d in range(D):
            e = x[bh, i, j, d]
            s0 += e * y[bh, r, c, d]
            s1 += e * y[bh, r, c + 1, d]
        s[u, t + b] = s0 * scale
        s[u, t + b + 1] = s1 * scale
    elif b < kw:
        c = c0 + b
        s0 = zero
        for d in range(D):
            s0 += x[bh, i, j, d] * y[bh, r, c, d]
        s[u, t + b] = s0 * scale


def _value_row_sum(w, u, t, y, bh, r, c0, kw, D, out, i, j):
    """out[bh, i, j] += sum_b w[u, t + b] * y[bh, r, c0 + b] over b < kw: one window row.

    The weighted rows are summed as a balanced tree and added to ``out`` once per group, so
    the dependency chain through the accumulator row is one add per group, not one per key.
    """
    b = 0
    while b + 7 <= kw:
        c = c0 + b
        w0, w1, w2, w3 = w[u, t + b], w[u, t + b + 1], w[u, t + b + 2], w[u, t + b + 3]
        w4, w5, w6 = w[u, t + b + 4], w[u, t + b + 5], w[u, t + b + 6]
        for d in range(D):
            out[bh, i, j, d] += (
                (w0 * y[bh, r, c, d] + w1 * y[bh, r, c + 1, d])
                + (w2 * y[bh, r, c + 2, d] + w3 * y[bh, r, c + 3, d])
            ) + ((w4 * y[bh, r, c + 4, d] + w5 * y[bh, r, c + 5, d]) + w6 * y[bh, r, c + 6, d])
        b += 7
    while b + 4 <= kw:
        c = c0 + b
        w0, w1, w2, w3 = w[u, t + b], w[u, t + b + 1], w[u, t + b + 2], w[u, t + b + 3]
        for d in range(D):
            out[bh, i, j, d] += (w0 * y[bh, r, c, d] + w1 * y[bh, r, c + 1, d]) + (
                w2 * y[bh, r, c + 2, d] + w3 * y[bh, r, c + 3, d]
            )
        b += 4
    if b + 3 <= kw:
        c = c0 + b
        w0, w1, w2 = w[u, t + b], w[u, t + b + 1], w[u, t + b + 2]
        for d in range(D):
            out[bh, i, j, d] += (w0 * y[bh, r, c, d] + w1 * y[bh, r, c + 1, d]) + (
                w2 * y[bh, r, c + 2, d]
            )
    elif b + 2 <= kw:
        c = c0 + b
        w0, w1 = w[u, t + b], w[u, t + b + 1]
        for d in range(D):
            out[bh, i, j, d] += w0 * y[bh, r, c, d] + w1 * y[bh, r, c + 1, d]
    elif b < kw:
        c = c0 + b
        w0 = w[u, t + b]
        for d in range(D):
            out[bh, i, j, d] += w0 * y[bh, r, c, d]


def _query_row_forward(q, k, v, out, lse, bh, i, r0, col_start, kh, kw, D, scale, s, base):
    """Forward for the W queries of row i of slice bh; s[base + j] is query j's scratch row.

    Three passes over the row, each with an L1-sized working set: the scores one key row at a
    time (the query row and one key row, 2 x W*D values), the softmax of each query's kh*kw
    scores, then the weighted sum one value row at a time (one value row and the output row).
    Walking query by query instead touches kh key rows and kh value rows per query, 56 KiB
    at 16x16, k = 7, D = 64, which spills the 32 KiB L1 and made the kernel L2-bound.
    """
    W = q.shape[2]
    nk = kh * kw
    zero = q.dtype.type(0.0)
    one = q.dtype.type(1.0)
    for a in range(kh):
        for j in range(W):
            _key_row_dots(q, bh, i, j, k, r0 + a, col_start[j], kw, D, scale, s, base + j, a * kw)
    for j in range(W):
        u = base + j
        m = s[u, 0]
        for t in range(1, nk):
            m = max(m, s[u, t])
        total = zero
        for t in range(nk):  # vectorised: unnormalised probabilities and their sum
            e = _softmax_exp(s[u, t] - m)
            s[u, t] = e
            total += e
        inv = one / total
        for t in range(nk):  # normalise the kh*kw weights rather than the D outputs
            s[u, t] *= inv
        lse[bh, i, j] = m + math.log(total)
        for d in range(D):
            out[bh, i, j, d] = zero
    for a in range(kh):
        for j in range(W):
            _value_row_sum(s, base + j, a * kw, v, bh, r0 + a, col_start[j], kw, D, out, i, j)


def _forward_kernel(q, k, v, out, lse, row_start, col_start, kh, kw, scale, scratch):
    BH, H, W, D = q.shape
    for row in prange(BH * H):  # (batch*head, query row) pairs: plenty of parallel work
        bh = row // H
        i = row - bh * H
        base = numba.get_thread_id() * W  # this worker's W scratch rows
        if kw == 7 and D == 64:  # the literal copy (see the comment above _key_row_dots)
            _query_row_forward(
                q, k, v, out, lse, bh, i, row_start[i], col_start, kh, 7, 64, scale, scratch, base
            )
        else:
            _query_row_forward(
                q, k, v, out, lse, bh, i, row_start[i], col_start, kh, kw, D, scale, scratch, base
            )


def _slice_backward(
    q, k, v, out, dout, lse, dq, dk, dv, bh, row_start, col_start, col_lo, col_hi,
    kh, kw, D, scale, s, base,
):  # fmt: skip
    """Backward for slice bh, one query row at a time, in passes over one key row at a time
    (the forward's L1-sized working sets). Softmax backward with p_t = exp(s_t - lse)
    recomputed from the saved logsumexp:
      delta = do . o,  ds_t = p_t (do . v_t - delta),
      dq = scale sum_t ds_t k_t,  dk_t += scale ds_t q,  dv_t += p_t do.
    s[base + j] holds query j's s_t then p_t; s[base + W + j] its do . v_t then ds_t;
    s[base + 2W] is spare.
    """
    _, H, W, _ = q.shape
    nk = kh * kw
    tmp = base + 2 * W
    zero = q.dtype.type(0.0)
    one = q.dtype.type(1.0)
    for r in range(H):
        for c in range(W):
            for d in range(D):
                dk[bh, r, c, d] = zero
                dv[bh, r, c, d] = zero
    for i in range(H):
        r0 = row_start[i]
        for a in range(kh):
            for j in range(W):
                c0 = col_start[j]
                _key_row_dots(q, bh, i, j, k, r0 + a, c0, kw, D, scale, s, base + j, a * kw)
                _key_row_dots(dout, bh, i, j, v, r0 + a, c0, kw, D, one, s, base + W + j, a * kw)
        for j in range(W):
            up = base + j
            ug = base + W + j
            delta = zero
            for d in range(D):
                delta += dout[bh, i, j, d] * out[bh, i, j, d]
            L = lse[bh, i, j]
            for t in range(nk):  # vectorised
                pt = _softmax_exp(s[up, t] - L)
                s[up, t] = pt
                s[ug, t] = pt * (s[ug, t] - delta)
            for d in range(D):
                dq[bh, i, j, d] = zero
        for a in range(kh):
            r = r0 + a
            for j in range(W):
                _value_row_sum(s, base + W + j, a * kw, k, bh, r, col_start[j], kw, D, dq, i, j)
            # dk, dv of key row r from this query row, gathered per key column c over the
            # queries lo..hi-1 whose windows hold it (weights copied into the spare scratch
            # row): one accumulation per key instead of one per (query, key) pair.
            for c in range(W):
                lo = col_lo[c]
                n = col_hi[c] - lo
                for b in range(n):
                    s[tmp, b] = s[base + W + lo + b, a * kw + c - col_start[lo + b]]
                _value_row_sum(s, tmp, 0, q, bh, i, lo, n, D, dk, r, c)
                for b in range(n):
                    s[tmp, b] = s[base + lo + b, a * kw + c - col_start[lo + b]]
                _value_row_sum(s, tmp, 0, dout, bh, i, lo, n, D, dv, r, c)
        for j in range(W):
            for d in range(D):
                dq[bh, i, j, d] *= scale
    for r in range(H):  # dk collected ds without the scale (one multiply per element)
        for c in range(W):
            for d in range(D):
                dk[bh, r, c, d] *= scale


def _backward_kernel(
    q, k, v, out, dout, lse, dq, dk, dv, row_start, col_start, col_lo, col_hi, kh, kw, scale,
    scratch,
):  # fmt: skip
    # One (batch, head) slice per parallel iteration, so the scatters into dk, dv never race.
    BH, _, W, D = q.shape
    for bh in prange(BH):
        base = (2 * W + 1) * numba.get_thread_id()  # this worker's 2W + 1 scratch rows
        if kw == 7 and D == 64:
            _slice_backward(
                q, k, v, out, dout, lse, dq, dk, dv, bh,
                row_start, col_start, col_lo, col_hi, kh, 7, 64, scale, scratch, base,
            )  # fmt: skip
        else:
            _slice_backward(
                q, k, v, out, dout, lse, dq, dk, dv, bh,
                row_start, col_start, col_lo, col_hi, kh, kw, D, scale, scratch, base,
            )  # fmt: skip


if _IMPORT_ERROR is None:
    from numba.core import types
    from numba.extending import overload

    # Strict IEEE (no fastmath) so the Cody-Waite reduction keeps its two constants; small
    # enough that LLVM inlines it into the kernels' loops (instruction flags survive inlining).
    _exp_f32_jit = njit(cache=True)(_exp_f32)

    @overload(_softmax_exp, jit_options={"cache": True})
    def _softmax_exp_overload(x):
        if x == types.float32:
            return lambda x: _exp_f32_jit(x)
        return lambda x: math.exp(x)

    _inline = njit(cache=True, inline="always", fastmath=_FASTMATH)
    _key_row_dots = _inline(_key_row_dots)
    _value_row_sum = _inline(_value_row_sum)
    _query_row_forward = _inline(_query_row_forward)
    _slice_backward = _inline(_slice_backward)
    # cache=True: compiling the two parallel kernels takes seconds; the on-disk cache
    # (__pycache__ next to this file) cuts later processes' start to a fraction of a second.
    _forward_jit = njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)(_forward_kernel)
    _backward_jit = njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)(
        _backward_kernel
    )


# --------------------------------------------------------------------------------------------
# torch glue
# --------------------------------------------------------------------------------------------


def _scratch(rows_per_thread: int, nk: int, dtype: np.dtype) -> np.ndarray:
    """Per-thread scratch rows, allocated once per call outside the kernels. get_thread_id()
    is < NUMBA_NUM_THREADS (the pool size) however many threads are active."""
    return np.empty((numba.config.NUMBA_NUM_THREADS * rows_per_thread, nk), dtype=dtype)


def _first_call(dispatcher: object, what: str, run) -> None:  # type: ignore[no-untyped-def]
    """Run ``run()``; on a kernel's first call in this process say in the log that it is being
    compiled (a cold compile takes about a minute on 2 cores) or loaded from the on-disk cache,
    and where that cache is, so a silent minute is never mistaken for a hang."""
    if getattr(dispatcher, "signatures", None):
        run()
        return
    stats = dispatcher.stats  # type: ignore[attr-defined]
    logger.info("numba %s kernel: first call in this process; compiling it or loading it from "
                "the cache in %s (a cold compile takes ~1 min)", what, stats.cache_path)  # fmt: skip
    t0 = time.perf_counter()
    run()
    how = "loaded from the cache" if sum(stats.cache_hits.values()) else "compiled and cached"
    logger.info("numba %s kernel %s in %.1f s (%s)", what, how, time.perf_counter() - t0,
                stats.cache_path)  # fmt: skip


def forward_arrays(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, kh: int, kw: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The forward kernel on numpy arrays [BH, H, W, D] (fp32 or fp64, C-contiguous).

    Returns (out [BH, H, W, D], lse [BH, H, W]) in the arrays' dtype.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    BH, H, W, _ = q.shape
    out = np.empty_like(q)
    lse = np.empty((BH, H, W), dtype=q.dtype)
    _first_call(_forward_jit, "na2d forward", lambda: _forward_jit(
        q, k, v, out, lse,
        window_start_array(H, kh), window_start_array(W, kw),
        kh, kw, q.dtype.type(scale), _scratch(W, kh * kw, q.dtype),
    ))  # fmt: skip
    return out, lse


def backward_arrays(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    kh: int,
    kw: int,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The backward kernel on numpy arrays (layouts as ``forward_arrays``); returns dq, dk, dv."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    _, H, W, _ = q.shape
    dq, dk, dv = np.empty_like(q), np.empty_like(q), np.empty_like(q)
    _first_call(_backward_jit, "na2d backward", lambda: _backward_jit(
        q, k, v, out, dout, lse, dq, dk, dv,
        window_start_array(H, kh), window_start_array(W, kw), *inverse_windows(W, kw),
        kh, kw, q.dtype.type(scale), _scratch(2 * W + 1, max(kh * kw, W), q.dtype),
    ))  # fmt: skip
    return dq, dk, dv


class _NumbaKernels:
    """The kernel pair for ``FusedNA2D``: torch CPU tensors in, through numpy views."""

    compute_dtype = staticmethod(compute_dtype)  # fp64 stays fp64 (the gradient checks)

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = forward_arrays(q.numpy(), k.numpy(), v.numpy(), kh, kw, scale)
        return torch.from_numpy(out), torch.from_numpy(lse)

    @staticmethod
    def backward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        kh: int,
        kw: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = backward_arrays(
            q.numpy(), k.numpy(), v.numpy(), out.numpy(), lse.numpy(), dout.numpy(),
            kh, kw, scale,
        )  # fmt: skip
        dq, dk, dv = (torch.from_numpy(g) for g in grads)
        return dq, dk, dv


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    if _IMPORT_ERROR is not None:  # na2d checks first; this guards direct calls
        raise RuntimeError(_IMPORT_ERROR)
    return FusedNA2D.apply(_NumbaKernels(), q, k, v, kh, kw, scale)
