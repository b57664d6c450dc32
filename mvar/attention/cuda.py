"""The cuda backend: neighbourhood-attention kernels written with numba's CUDA target.

Three kernels, fp32 throughout (fp16/bf16 inputs are converted on the way in and results
converted back; numba has no tensor-core instructions, so this is plain FMA arithmetic). Why
the autocast dtypes are upcast rather than computed natively: numba.cuda has an fp16 type but
no bf16 one, the scores, softmax and weighted sums must accumulate in fp32 anyway, and without
tensor cores a native fp16 kernel would only save the conversion's memory traffic (not measured
here: no GPU):

- ``_forward_kernel``: one thread block per query. Threads first take one window key each
  (scores into shared memory), then one output dimension each (weighted sum of values). Windows
  larger than the block are done in chunks of one key per thread with an online softmax (running
  max and sum, rescaling the partial output), so any kh*kw works with a fixed shared buffer. It
  also writes the logsumexp of each query for the backward.
- ``_backward_dq_kernel``: one block per query; recomputes p_t = exp(s_t - lse) and
  ds_t = p_t (do . v_t - delta) with delta = do . o, writes dq and delta.
- ``_backward_dkdv_kernel``: one block per key; walks the queries whose window holds that key
  (a contiguous range per axis, ``inverse_windows``) and gathers dk and dv, so no atomics.

Two ways in: ``forward`` (torch CUDA tensors, launched on torch's current stream through
``cuda.external_stream`` with tensors wrapped by ``cuda.as_cuda_array`` and outputs allocated by
torch) and ``forward_host`` / ``backward_host`` (numpy arrays: ``cuda.to_device``, launch, copy
back), which is what the CPU test suite drives under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``). ``kernels_for_ptx()`` lists every kernel with its signature for
``numba.cuda.compile_ptx``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np
import torch

from mvar.attention._common import FusedNA2D, inverse_windows, window_start_array

logger = logging.getLogger(__name__)

try:
    from numba import cuda as nb_cuda
    from numba import float32, int32, int64

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001  (ImportError, or CUDA library errors at import)
    nb_cuda = None
    float32 = np.float32  # type: ignore[assignment]  # keeps the kernel bodies importable
    int32 = int64 = None  # type: ignore[assignment]
    _IMPORT_ERROR = (
        f"numba's CUDA target is not importable ({type(exc).__name__}: {exc}); install it "
        "with `pip install 'mvar[cuda]'`"
    )

# Threads per block. 64 covers MVAR's window (49 keys) and head dim (64) in one step each;
# larger windows or head dims loop. A compile-time constant: it sizes the shared arrays.
BLOCK = 64

_ZERO = float32(0.0)
_ONE = float32(1.0)
_NEG_INF = float32(-math.inf)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(
    device: torch.device, dtype: torch.dtype | None = None, requires_grad: bool = False
) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got device {device}"
    if dtype is not None and dtype not in _DTYPES:
        return (
            f"the cuda backend computes in fp32 and takes {_DTYPES}, got {dtype} (fp64 would "
            "silently lose precision); use backend='dense' or 'reference' for fp64"
        )
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        if not nb_cuda.is_available():
            return "numba.cuda.is_available() is False (no usable CUDA driver for numba)"
    except Exception as exc:  # noqa: BLE001  (driver probing can raise, not return False)
        return f"numba.cuda.is_available() raised {type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------------------
# Kernels. q, k, v, out, dout, dq, dk, dv: [BH, H, W, D] fp32 C-contiguous; lse, delta:
# [BH, H, W] fp32; row_start/col_start: int32 clamp-rule window starts per query row/column;
# q_row_lo/hi, q_col_lo/hi: int32 inverse windows (queries whose window holds a key row/col).
# The block index is the flat query (or key) index bh*H*W + i*W + j, so neighbouring blocks
# read overlapping windows and share them in L2. Every thread runs every loop (no early
# return) because the block synchronises between phases.
# --------------------------------------------------------------------------------------------


def _kernel_functions(block: int) -> dict[str, Any]:
    """The kernels' Python functions for ``block`` threads per block (a compile-time constant:
    it sizes the shared arrays). Production launches use ``BLOCK``; the simulator tests use a
    small block, which is cheaper to simulate and sends every window and head dim through the
    chunked loops."""

    def _forward_kernel(q, k, v, out, lse, row_start, col_start, kh, kw, scale):
        sh = nb_cuda.shared.array(block, float32)
        _, H, W, D = q.shape
        tid = nb_cuda.threadIdx.x
        flat = nb_cuda.blockIdx.x
        bh = flat // (H * W)
        rem = flat - bh * (H * W)
        i = rem // W
        j = rem - i * W
        r0 = row_start[i]
        c0 = col_start[j]
        nk = kh * kw
        m = _NEG_INF  # running max of the scores seen so far
        total = _ZERO  # running sum of exp(score - m)
        for base in range(0, nk, block):
            n = min(block, nk - base)
            # phase 1: one key per thread, s = scale * q . k
            if tid < n:
                t = base + tid
                r = r0 + t // kw
                c = c0 + t % kw
                acc = _ZERO
                for d in range(D):
                    acc += q[bh, i, j, d] * k[bh, r, c, d]
                sh[tid] = acc * scale
            nb_cuda.syncthreads()
            m_new = m
            for t in range(n):
                m_new = max(m_new, sh[t])
            alpha = math.exp(m - m_new)  # rescales what was accumulated under the old max
            nb_cuda.syncthreads()  # every thread has read the raw scores before they change
            if tid < n:
                sh[tid] = math.exp(sh[tid] - m_new)
            nb_cuda.syncthreads()
            part = _ZERO
            for t in range(n):
                part += sh[t]
            total = total * alpha + part
            # phase 2: one output dimension per thread
            for d in range(tid, D, block):
                acc = _ZERO
                for t in range(n):
                    tt = base + t
                    acc += sh[t] * v[bh, r0 + tt // kw, c0 + tt % kw, d]
                if base == 0:
                    out[bh, i, j, d] = acc
                else:
                    out[bh, i, j, d] = out[bh, i, j, d] * alpha + acc
            m = m_new
            nb_cuda.syncthreads()  # before the next chunk overwrites sh
        inv = _ONE / total
        for d in range(tid, D, block):
            out[bh, i, j, d] *= inv
        if tid == 0:
            lse[bh, i, j] = m + math.log(total)

    def _backward_dq_kernel(
        q, k, v, out, dout, lse, dq, delta, row_start, col_start, kh, kw, scale
    ):
        sh = nb_cuda.shared.array(block, float32)
        red = nb_cuda.shared.array(block, float32)
        _, H, W, D = q.shape
        tid = nb_cuda.threadIdx.x
        flat = nb_cuda.blockIdx.x
        bh = flat // (H * W)
        rem = flat - bh * (H * W)
        i = rem // W
        j = rem - i * W
        r0 = row_start[i]
        c0 = col_start[j]
        nk = kh * kw
        # delta = do . o, reduced over the block through shared memory
        part = _ZERO
        for d in range(tid, D, block):
            part += dout[bh, i, j, d] * out[bh, i, j, d]
        red[tid] = part
        nb_cuda.syncthreads()
        dl = _ZERO
        for t in range(block):
            dl += red[t]
        if tid == 0:
            delta[bh, i, j] = dl
        L = lse[bh, i, j]
        for base in range(0, nk, block):
            n = min(block, nk - base)
            if tid < n:
                t = base + tid
                r = r0 + t // kw
                c = c0 + t % kw
                s = _ZERO
                g = _ZERO
                for d in range(D):
                    s += q[bh, i, j, d] * k[bh, r, c, d]
                    g += dout[bh, i, j, d] * v[bh, r, c, d]
                p = math.exp(s * scale - L)
                sh[tid] = p * (g - dl)  # ds_t
            nb_cuda.syncthreads()
            for d in range(tid, D, block):
                acc = _ZERO
                for t in range(n):
                    tt = base + t
                    acc += sh[t] * k[bh, r0 + tt // kw, c0 + tt % kw, d]
                if base == 0:
                    dq[bh, i, j, d] = acc
                else:
                    dq[bh, i, j, d] += acc
            nb_cuda.syncthreads()
        for d in range(tid, D, block):
            dq[bh, i, j, d] *= scale

    def _backward_dkdv_kernel(
        q, k, v, dout, lse, delta, dk, dv, q_row_lo, q_row_hi, q_col_lo, q_col_hi, scale
    ):
        sp = nb_cuda.shared.array(block, float32)
        sds = nb_cuda.shared.array(block, float32)
        _, H, W, D = q.shape
        tid = nb_cuda.threadIdx.x
        flat = nb_cuda.blockIdx.x
        bh = flat // (H * W)
        rem = flat - bh * (H * W)
        r = rem // W  # this block's key
        c = rem - r * W
        i0 = q_row_lo[r]
        j0 = q_col_lo[c]
        ncol = q_col_hi[c] - j0
        nq = (q_row_hi[r] - i0) * ncol
        for d in range(tid, D, block):
            dk[bh, r, c, d] = _ZERO
            dv[bh, r, c, d] = _ZERO
        for base in range(0, nq, block):
            n = min(block, nq - base)
            if tid < n:
                t = base + tid
                i = i0 + t // ncol
                j = j0 + t % ncol
                s = _ZERO
                g = _ZERO
                for d in range(D):
                    s += q[bh, i, j, d] * k[bh, r, c, d]
                    g += dout[bh, i, j, d] * v[bh, r, c, d]
                p = math.exp(s * scale - lse[bh, i, j])
                sp[tid] = p
                sds[tid] = p * (g - delta[bh, i, j])
            nb_cuda.syncthreads()
            for d in range(tid, D, block):
                acc_k = _ZERO
                acc_v = _ZERO
                for t in range(n):
                    tt = base + t
                    i = i0 + tt // ncol
                    j = j0 + tt % ncol
                    acc_k += sds[t] * q[bh, i, j, d]
                    acc_v += sp[t] * dout[bh, i, j, d]
                dk[bh, r, c, d] += acc_k * scale
                dv[bh, r, c, d] += acc_v
            nb_cuda.syncthreads()

    return {
        "forward": _forward_kernel,
        "backward_dq": _backward_dq_kernel,
        "backward_dkdv": _backward_dkdv_kernel,
    }


def kernel_signatures() -> dict[str, tuple[Any, ...]]:
    """The signature each kernel is launched with (C-contiguous fp32 arrays, int32 window
    indices, int64 sizes, fp32 scale), for ``numba.cuda.compile_ptx``."""
    a4 = float32[:, :, :, ::1]
    a3 = float32[:, :, ::1]
    ix = int32[::1]
    return {
        "forward": (a4, a4, a4, a4, a3, ix, ix, int64, int64, float32),
        "backward_dq": (a4, a4, a4, a4, a4, a3, a4, a3, ix, ix, int64, int64, float32),
        "backward_dkdv": (a4, a4, a4, a4, a3, a3, a4, a4, ix, ix, ix, ix, float32),
    }


def kernels_for_ptx(block: int = BLOCK) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """name -> (Python function, signature) for every kernel: what the PTX test compiles."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    funcs = _kernel_functions(block)
    return {name: (funcs[name], sig) for name, sig in kernel_signatures().items()}


@functools.lru_cache(maxsize=4)
def _jitted(block: int) -> dict[str, Any]:
    """numba.cuda.jit dispatchers for one block size (compiled lazily, on first launch)."""
    if not isinstance(block, int) or not 1 <= block <= 1024:
        raise ValueError(f"block must be an int in [1, 1024] threads, got {block!r}")
    return {name: nb_cuda.jit(fn) for name, fn in _kernel_functions(block).items()}


# --------------------------------------------------------------------------------------------
# Launchers, shared by the torch path and the host (numpy / simulator) path. Arguments are
# device arrays (numba DeviceNDArray, or torch tensors wrapped by as_cuda_array).
# --------------------------------------------------------------------------------------------


def _launch_forward(
    q, k, v, out, lse, idx, kh: int, kw: int, scale: float, stream, block: int = BLOCK
) -> None:
    BH, H, W, _ = q.shape
    row_start, col_start = idx
    _jitted(block)["forward"][BH * H * W, block, stream](
        q, k, v, out, lse, row_start, col_start, kh, kw, np.float32(scale)
    )


def _launch_backward(
    q,
    k,
    v,
    out,
    dout,
    lse,
    dq,
    dk,
    dv,
    delta,
    idx,
    inv,
    kh: int,
    kw: int,
    scale: float,
    stream,
    block: int = BLOCK,
) -> None:
    BH, H, W, _ = q.shape
    row_start, col_start = idx
    q_row_lo, q_row_hi, q_col_lo, q_col_hi = inv
    s = np.float32(scale)
    # dq first: it also writes delta, which the key-centric pass reads (same stream, in order)
    kernels = _jitted(block)
    kernels["backward_dq"][BH * H * W, block, stream](
        q, k, v, out, dout, lse, dq, delta, row_start, col_start, kh, kw, s
    )
    kernels["backward_dkdv"][BH * H * W, block, stream](
        q, k, v, dout, lse, delta, dk, dv, q_row_lo, q_row_hi, q_col_lo, q_col_hi, s
    )


def _index_arrays(H: int, W: int, kh: int, kw: int) -> tuple[tuple[np.ndarray, ...], ...]:
    rows_lo, rows_hi = inverse_windows(H, kh)
    cols_lo, cols_hi = inverse_windows(W, kw)
    idx = (window_start_array(H, kh), window_start_array(W, kw))
    return idx, (rows_lo, rows_hi, cols_lo, cols_hi)


def _check_host(name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.shape != shape:
        got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a numpy array of shape {shape}, got {got}")
    return np.ascontiguousarray(a, dtype=np.float32)


def forward_host(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    kernel_size: tuple[int, int],
    scale: float,
    block: int = BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the forward kernel on host arrays [B, heads, H, W, D] (copied to the device, run,
    copied back; under ``NUMBA_ENABLE_CUDASIM=1`` the simulator runs it).

    Returns (out [B, heads, H, W, D], lse [B, heads, H, W]), fp32.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    B, heads, H, W, D = q.shape
    kh, kw = kernel_size
    flat = (B * heads, H, W, D)
    q_, k_, v_ = (
        _check_host(n, a, q.shape).reshape(flat) for n, a in (("q", q), ("k", k), ("v", v))
    )
    idx, _ = _index_arrays(H, W, kh, kw)
    d_out = nb_cuda.device_array(flat, dtype=np.float32)
    d_lse = nb_cuda.device_array(flat[:3], dtype=np.float32)
    _launch_forward(
        nb_cuda.to_device(q_), nb_cuda.to_device(k_), nb_cuda.to_device(v_), d_out, d_lse,
        tuple(nb_cuda.to_device(np.ascontiguousarray(a)) for a in idx), kh, kw, scale, 0, block,
    )  # fmt: skip
    return d_out.copy_to_host().reshape(q.shape), d_lse.copy_to_host().reshape(q.shape[:4])


def backward_host(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    kernel_size: tuple[int, int],
    scale: float,
    block: int = BLOCK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run both backward kernels on host arrays (layouts as ``forward_host``); returns
    (dq, dk, dv), fp32, each [B, heads, H, W, D]."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    B, heads, H, W, D = q.shape
    kh, kw = kernel_size
    flat = (B * heads, H, W, D)
    arrays = [
        _check_host(n, a, q.shape).reshape(flat)
        for n, a in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout))
    ]
    lse_ = _check_host("lse", lse, q.shape[:4]).reshape(flat[:3])
    idx, inv = _index_arrays(H, W, kh, kw)
    d_q, d_k, d_v, d_out, d_dout = (nb_cuda.to_device(a) for a in arrays)
    grads = [nb_cuda.device_array(flat, dtype=np.float32) for _ in range(3)]
    d_delta = nb_cuda.device_array(flat[:3], dtype=np.float32)
    _launch_backward(
        d_q, d_k, d_v, d_out, d_dout, nb_cuda.to_device(lse_), *grads, d_delta,
        tuple(nb_cuda.to_device(np.ascontiguousarray(a)) for a in idx),
        tuple(nb_cuda.to_device(np.ascontiguousarray(a)) for a in inv),
        kh, kw, scale, 0, block,
    )  # fmt: skip
    dq, dk, dv = (g.copy_to_host().reshape(q.shape) for g in grads)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _device_index(H: int, W: int, kh: int, kw: int, device: torch.device) -> tuple[Any, Any]:
    """The window index arrays as int32 CUDA tensors, built once per shape and device."""
    idx, inv = _index_arrays(H, W, kh, kw)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return tuple(to_t(a) for a in idx), tuple(to_t(a) for a in inv)


def _cai(t: torch.Tensor) -> Any:
    # sync=False: we launch on the stream torch is using, so no extra synchronisation is due.
    return nb_cuda.as_cuda_array(t.detach(), sync=False)


class _CudaKernels:
    """The kernel pair for ``FusedNA2D``: torch CUDA tensors, launched on torch's current
    stream; outputs allocated by torch."""

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # the kernels are fp32 only

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = q.shape[1:3]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        idx, _ = _device_index(H, W, kh, kw, q.device)
        with nb_cuda.gpus[q.device.index or 0]:
            stream = nb_cuda.external_stream(torch.cuda.current_stream(q.device).cuda_stream)
            _launch_forward(
                _cai(q), _cai(k), _cai(v), _cai(out), _cai(lse),
                tuple(_cai(a) for a in idx), kh, kw, scale, stream,
            )  # fmt: skip
        return out, lse

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
        H, W = q.shape[1:3]
        dq, dk, dv = (torch.empty_like(q) for _ in range(3))
        delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        idx, inv = _device_index(H, W, kh, kw, q.device)
        with nb_cuda.gpus[q.device.index or 0]:
            stream = nb_cuda.external_stream(torch.cuda.current_stream(q.device).cuda_stream)
            _launch_backward(
                _cai(q), _cai(k), _cai(v), _cai(out), _cai(dout), _cai(lse),
                _cai(dq), _cai(dk), _cai(dv), _cai(delta),
                tuple(_cai(a) for a in idx), tuple(_cai(a) for a in inv),
                kh, kw, scale, stream,
            )  # fmt: skip
        return dq, dk, dv


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    if _IMPORT_ERROR is not None:  # na2d checks first; this guards direct calls
        raise RuntimeError(_IMPORT_ERROR)
    return FusedNA2D.apply(_CudaKernels(), q, k, v, kh, kw, scale)
