"""Shared pieces of the neighbourhood-attention package: input validation, the window rule, the
per-dtype tolerance table and the backend registry.

Everything that defines *what* ``na2d`` computes lives here once, so the backends only decide
*how*. The semantics are NATTEN's (``docs/neighbourhood_attention.md`` §1):
along an axis of length n with kernel k <= n, query i sees keys start(i) .. start(i)+k-1 with
start(i) = clamp(i - k//2, 0, n - k).
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np
import torch
from torch.autograd.function import once_differentiable

# dtypes every backend accepts at the API boundary. Integer or complex inputs are a TypeError.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


class BackendUnavailableError(ValueError):
    """The requested backend cannot run these inputs here (the message says why).

    A ``ValueError`` because the caller passed a ``backend=`` value that is invalid for these
    tensors; the reason names what is missing (a package, a device, a backward pass)."""


# --------------------------------------------------------------------------------------------
# The window rule
# --------------------------------------------------------------------------------------------


def _check_axis(n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"kernel size must be >= 1, got {k}")
    if k > n:
        # NATTEN raises too (docs/neighbourhood_attention.md §1): a window wider than the grid has no clamp.
        raise ValueError(f"kernel size {k} exceeds the grid side {n}; expected 1 <= k <= {n}")


@functools.lru_cache(maxsize=256)
def window_starts(n: int, k: int) -> tuple[int, ...]:
    """First key index of each query's window along one axis of length ``n``.

    start(i) = clamp(i - k//2, 0, n - k) (docs/neighbourhood_attention.md §1), so every window has exactly k keys
    and contains its query; near a border the window shifts inwards instead of being cut.
    e.g. ``window_starts(13, 7) == (0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 6, 6)``.
    """
    _check_axis(n, k)
    return tuple(min(max(i - k // 2, 0), n - k) for i in range(n))


@functools.lru_cache(maxsize=256)
def window_start_array(n: int, k: int) -> np.ndarray:
    """``window_starts`` as a read-only int32 array (what the kernels index with)."""
    arr = np.asarray(window_starts(n, k), dtype=np.int32)
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=256)
def inverse_windows(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each key index r along an axis, the queries whose window holds it: ``lo[r] <= i < hi[r]``.

    start(i) is non-decreasing in i, so {i : start(i) <= r < start(i) + k} is one contiguous
    range; the backward kernels use it to gather a key's gradient without atomics. Read-only
    int32 arrays.
    """
    starts = np.asarray(window_starts(n, k), dtype=np.int64)
    keys = np.arange(n)
    hi = np.searchsorted(starts, keys, side="right")  # first i with start(i) > r
    lo = np.searchsorted(starts, keys - k, side="right")  # first i with start(i) > r - k
    lo_arr, hi_arr = lo.astype(np.int32), hi.astype(np.int32)
    lo_arr.setflags(write=False)
    hi_arr.setflags(write=False)
    return lo_arr, hi_arr


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def normalize_kernel_size(kernel_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7`` -> ``(7, 7)``; ``(kh, kw)`` stays. Bools and non-integers are a TypeError."""

    def _is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if _is_int(kernel_size):
        kh = kw = int(kernel_size)  # type: ignore[arg-type]
    elif (
        isinstance(kernel_size, (tuple, list))
        and len(kernel_size) == 2
        and all(_is_int(x) for x in kernel_size)
    ):
        kh, kw = int(kernel_size[0]), int(kernel_size[1])
    else:
        raise TypeError(
            f"kernel_size must be an int or a pair of ints (kh, kw), got {kernel_size!r}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel_size must be >= 1 on both axes, got ({kh}, {kw})")
    return kh, kw


@dataclass(frozen=True)
class Problem:
    """A validated ``na2d`` call: q, k, v are [B, heads, H, W, D]."""

    B: int
    heads: int
    H: int
    W: int
    D: int
    kh: int
    kw: int
    scale: float
    dtype: torch.dtype
    device: torch.device


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, int],
    scale: float | None,
) -> Problem:
    """Check the arguments of ``na2d`` and return the problem they describe.

    Raises TypeError for wrong types/dtypes and ValueError for wrong ranks, shapes, devices,
    kernel sizes or scales; each message says what was wrong and what was expected.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(
                f"{name} must have shape [B, heads, H, W, D] (5 dims), got {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; expected one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k and v must have the same shape [B, heads, H, W, D]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device; got q on {q.device}, k on {k.device}, "
            f"v on {v.device}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    B, heads, H, W, D = q.shape
    if min(B, heads, H, W, D) < 1:
        raise ValueError(
            f"every dimension of [B, heads, H, W, D] must be >= 1, got {tuple(q.shape)}"
        )
    kh, kw = normalize_kernel_size(kernel_size)
    if kh > H or kw > W:
        raise ValueError(
            f"kernel_size ({kh}, {kw}) exceeds the grid ({H}, {W}); expected kh <= H and "
            "kw <= W (a window wider than the grid is undefined, as in NATTEN)"
        )
    if scale is None:
        scale_f = D**-0.5
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(
            scale, (int, float, np.floating, np.integer)
        ):
            raise TypeError(f"scale must be a real number or None, got {scale!r}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale must be finite, got {scale_f}")
    return Problem(B, heads, H, W, D, kh, kw, scale_f, q.dtype, q.device)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will record this call (a backward pass may follow)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def flatten_heads(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, heads, H, W, D] -> contiguous [B*heads, H, W, D] in ``dtype``, the layout the fused
    kernels (numba, cuda) take; no copy when it already is."""
    B, heads, H, W, D = t.shape
    return t.detach().to(dtype).contiguous().view(B * heads, H, W, D)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and accumulate in: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FusedKernels(Protocol):
    """A fused backend's kernel pair on flattened [B*heads, H, W, D] tensors (``flatten_heads``)
    in its compute dtype; lse is the per-query logsumexp [B*heads, H, W]."""

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype: ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        kh: int,
        kw: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class FusedNA2D(torch.autograd.Function):
    """The autograd glue of the fused backends (numba, cuda): ``FusedNA2D.apply(kernels, q, k,
    v, kh, kw, scale)`` flattens the heads into the kernels' layout and compute dtype, saves
    q, k, v, the output and the logsumexp (the backward recomputes the probabilities from it)
    and returns results in the input dtype. Not twice differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        kernels: FusedKernels,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kh: int,
        kw: int,
        scale: float,
    ) -> torch.Tensor:
        ct = kernels.compute_dtype(q.dtype)
        q_, k_, v_ = (flatten_heads(t, ct) for t in (q, k, v))
        out, lse = kernels.forward(q_, k_, v_, kh, kw, scale)
        ctx.save_for_backward(q_, k_, v_, out, lse)
        ctx.kernels = kernels
        ctx.args = (kh, kw, scale)
        ctx.in_dtype = q.dtype
        return out.view(q.shape).to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q_, k_, v_, out, lse = ctx.saved_tensors
        dout_ = flatten_heads(dout, q_.dtype)
        grads = ctx.kernels.backward(q_, k_, v_, out, lse, dout_, *ctx.args)
        dq, dk, dv = (g.view(dout.shape).to(ctx.in_dtype) for g in grads)
        return None, dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """``|x - oracle| <= atol + rtol * |oracle|`` elementwise (``torch.testing`` semantics)."""

    atol: float
    rtol: float


# Per input dtype, for a backend's output and for its gradients, against the fp64 reference
# run on the *same* (already rounded) inputs. The low-precision rows are set by the rounding of
# the result to the input dtype (fp16 ulp/2 = 2^-11 ~ 4.9e-4, bf16 = 2^-8 ~ 3.9e-3, relative)
# plus what an fp32 accumulation adds; outputs of attention are convex combinations of v, so
# they are O(|v|) and an absolute term of the same order as the relative one covers entries
# near zero. Gradients are sums over up to kh*kw (and for dk/dv up to ~2x that) products, so
# they get a looser absolute term. fp32 allows reassociated sums (the numba kernel reassociates
# its dot products; SDPA blocks its own way). The fp16/bf16 gradient rows are set by plain
# PyTorch in the same dtype (flash-attention's habit): SDPA's backward runs in the input dtype
# and reaches ~1e-2 (fp16) and ~1e-1 (bf16) absolute on O(1) gradients, while the fused kernels,
# accumulating in fp32, stay ~10x inside. Calibrated on random normal problems
# (tests/test_attention.py) with a 2x margin over the worst backend seen; a backend computing the
# wrong operator misses them widely (a truncated window is off by ~1e-1 in fp64).
TOLERANCES: dict[torch.dtype, dict[str, Tolerance]] = {
    torch.float64: {"out": Tolerance(1e-10, 1e-8), "grad": Tolerance(1e-9, 1e-7)},
    torch.float32: {"out": Tolerance(2e-5, 2e-4), "grad": Tolerance(1e-4, 5e-4)},
    torch.float16: {"out": Tolerance(2e-3, 2e-3), "grad": Tolerance(2.5e-2, 2e-2)},
    torch.bfloat16: {"out": Tolerance(1.6e-2, 1.6e-2), "grad": Tolerance(2e-1, 5e-2)},
}


def tolerance(dtype: torch.dtype, kind: str = "out") -> Tolerance:
    """The tolerance for ``dtype`` results; ``kind`` is ``"out"`` or ``"grad"``."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}")
    if kind not in ("out", "grad"):
        raise ValueError(f"kind must be 'out' or 'grad', got {kind!r}")
    return TOLERANCES[dtype][kind]


# --------------------------------------------------------------------------------------------
# Backend registry
# --------------------------------------------------------------------------------------------


class BackendModule(Protocol):
    """What every backend module provides."""

    def unavailable_reason(
        self, device: torch.device, dtype: torch.dtype | None, requires_grad: bool
    ) -> str | None: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kh: int,
        kw: int,
        scale: float,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str  # imported on first use, so `import mvar.attention` stays cheap (numba is slow)
    summary: str


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo(
            "reference",
            "mvar.attention.reference",
            "explicit gather + softmax in fp32/fp64; the oracle of every test, not fast",
        ),
        BackendInfo(
            "dense",
            "mvar.attention.dense",
            "scaled_dot_product_attention with a cached boolean mask (full-attention FLOPs)",
        ),
        BackendInfo(
            "flex",
            "mvar.attention.flex",
            "FlexAttention with a block mask from the clamp rule (no backward on CPU)",
        ),
        BackendInfo(
            "numba",
            "mvar.attention.numba_cpu",
            "fused numba CPU kernels (forward and backward), parallel over B*heads*rows",
        ),
        BackendInfo(
            "cuda",
            "mvar.attention.cuda",
            "numba.cuda kernels (forward and backward) on torch's current stream, fp32",
        ),
    )
}

# What ``backend=None`` tries, fastest first, per device type (docs/neighbourhood_attention.md §3: CPU numba else dense;
# CUDA cuda else flex else dense). The first whose check passes wins; the choice is logged.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("numba", "dense"),
    "cuda": ("cuda", "flex", "dense"),
}
FALLBACK_ORDER: tuple[str, ...] = ("dense", "reference")


def _check_name(name: str) -> BackendInfo:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def load_backend(name: str) -> BackendModule:
    """Import and return a backend's module (its optional dependencies are guarded inside)."""
    module: ModuleType = importlib.import_module(_check_name(name).module)
    return module  # type: ignore[return-value]


def as_device(device: torch.device | str) -> torch.device:
    if isinstance(device, str):
        return torch.device(device)
    if isinstance(device, torch.device):
        return device
    raise TypeError(f"device must be a torch.device or a string, got {device!r}")
