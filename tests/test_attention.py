"""Neighbourhood attention: every CPU backend against the reference, the window rule pinned,
the reference against a brute-force softmax, gradients, error messages, and the CUDA kernels
under numba's simulator (subprocess).

The oracle is ``mvar.attention.reference`` run in fp64 on the same (already rounded) inputs;
tolerances come from ``mvar.attention.TOLERANCES`` (docs/neighbourhood_attention.md §4).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mvar.attention import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_unavailable_reason,
    default_backend,
    inverse_windows,
    na2d,
    reference,
    tolerance,
    window_starts,
)
from tests.conftest import REPO_ROOT

CPU = torch.device("cpu")
FAST_BACKENDS = ("dense", "flex", "numba")  # the CPU backends checked against the reference
GRAD_BACKENDS = ("dense", "numba")  # ... of which these have a backward on CPU
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _skip_unless_runnable(name: str, requires_grad: bool = False) -> None:
    reason = backend_unavailable_reason(name, CPU, requires_grad=requires_grad)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable here: {reason}")


def _qkv(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ks, scale) -> torch.Tensor:
    """The reference in fp64 on the same rounded inputs."""
    return na2d(q.double(), k.double(), v.double(), ks, scale, backend="reference")


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, kind: str) -> None:
    tol = tolerance(dtype, kind)
    torch.testing.assert_close(got.double(), want.double(), atol=tol.atol, rtol=tol.rtol)


def _run(name: str, q, k, v, ks, scale) -> torch.Tensor:
    if name == "flex":  # forward only on CPU
        with torch.no_grad():
            return na2d(q, k, v, ks, scale, backend=name)
    return na2d(q, k, v, ks, scale, backend=name)


# --------------------------------------------------------------------------------------------
# The window rule
# --------------------------------------------------------------------------------------------


def test_window_starts_pin_the_spec_rows() -> None:
    assert window_starts(13, 7) == (0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 6, 6)
    assert window_starts(16, 7) == (0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9)
    assert window_starts(7, 7) == (0,) * 7  # k = n: everyone sees everything
    assert window_starts(1, 1) == (0,)
    assert window_starts(6, 4) == (0, 0, 0, 1, 2, 2)  # even k: i - 2, clamped to [0, 2]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_window_starts_follow_the_clamp_rule(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, n))
    starts = window_starts(n, k)
    assert len(starts) == n
    for i, s in enumerate(starts):
        assert s == max(0, min(i - k // 2, n - k))
        assert 0 <= s <= n - k  # exactly k keys, all inside the axis
        assert s <= i < s + k  # the window contains its query
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(starts))
    lo, hi = inverse_windows(n, k)
    for r in range(n):
        holders = [i for i in range(n) if starts[i] <= r < starts[i] + k]
        assert holders == list(range(lo[r], hi[r]))


def test_window_rule_rejects_bad_kernels() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        window_starts(6, 7)
    with pytest.raises(ValueError, match=">= 1"):
        window_starts(6, 0)


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------


def test_reference_equals_brute_force_per_query_softmax() -> None:
    B, heads, H, W, D, kh, kw, scale = 2, 2, 5, 4, 3, 3, 2, 0.8
    q, k, v = _qkv((B, heads, H, W, D), torch.float64, seed=1)
    out = na2d(q, k, v, (kh, kw), scale, backend="reference")
    for b in range(B):
        for h in range(heads):
            for i in range(H):
                for j in range(W):
                    r0 = max(0, min(i - kh // 2, H - kh))  # written out again, on purpose
                    c0 = max(0, min(j - kw // 2, W - kw))
                    keys = [(r, c) for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
                    logits = [scale * float(q[b, h, i, j] @ k[b, h, r, c]) for r, c in keys]
                    mx = max(logits)
                    w = [math.exp(x - mx) for x in logits]
                    want = sum(wi * v[b, h, r, c] for wi, (r, c) in zip(w, keys)) / sum(w)
                    torch.testing.assert_close(out[b, h, i, j], want, atol=1e-12, rtol=1e-12)


def test_reference_key_index_covers_each_window_exactly() -> None:
    idx = reference.window_key_index(16, 13, 7, 4, CPU)
    assert idx.shape == (16 * 13, 28)
    assert all(len(set(row.tolist())) == 28 for row in idx)


# --------------------------------------------------------------------------------------------
# Backends against the reference
# --------------------------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn, dtypes=ALL_DTYPES, mvar_head: bool = False) -> dict:
    """Random valid problems. ``mvar_head``: D = 64 and kw = 7, the shapes for which the numba
    kernels run their copy compiled with literal trip counts (everything else still drawn)."""
    H = draw(st.integers(1, 20))
    W = draw(st.integers(7 if mvar_head else 1, 20))
    kh = draw(st.integers(1, H))
    kw = 7 if mvar_head else draw(st.integers(1, W))
    B = draw(st.integers(1, 2 if mvar_head else 3))
    heads = draw(st.integers(1, 2 if mvar_head else 3))
    D = 64 if mvar_head else draw(st.integers(1, 17))
    # the reference materialises [B, heads, H*W, kh*kw, D]: keep it to a few MB
    assume(B * heads * H * W * kh * kw * D <= (4_000_000 if mvar_head else 1_500_000))
    return {
        "shape": (B, heads, H, W, D),
        "ks": (kh, kw) if draw(st.booleans()) or kh != kw else kh,
        "scale": draw(st.sampled_from([None, 1.0, 0.37, 2.5])),
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize("name", FAST_BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_backend_matches_reference(name: str, p: dict) -> None:
    _skip_unless_runnable(name)
    q, k, v = _qkv(p["shape"], p["dtype"], p["seed"])
    out = _run(name, q, k, v, p["ks"], p["scale"])
    assert out.dtype == p["dtype"] and out.shape == q.shape
    _assert_close(out, _oracle(q, k, v, p["ks"], p["scale"]), p["dtype"], "out")


PINNED = [  # (shape [B, heads, H, W, D], kernel_size)
    ((1, 2, 13, 13, 64), 7),  # MVAR's scale 8
    ((2, 2, 16, 16, 8), 7),  # MVAR's scale 9 (small D)
    ((1, 1, 16, 16, 64), 7),
    ((1, 1, 1, 1, 5), 1),  # 1x1 grid
    ((1, 1, 5, 9, 3), (5, 9)),  # k = side on both axes
    ((2, 1, 7, 4, 6), (7, 2)),  # k = side on one axis, even on the other
    ((1, 3, 6, 11, 33), (4, 6)),  # even kernels, odd D
]


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "ks"), PINNED)
def test_backend_matches_reference_pinned(name: str, dtype: torch.dtype, shape, ks) -> None:
    _skip_unless_runnable(name)
    q, k, v = _qkv(shape, dtype, seed=7)
    for scale in (None, 1.0):
        out = _run(name, q, k, v, ks, scale)
        _assert_close(out, _oracle(q, k, v, ks, scale), dtype, "out")


@pytest.mark.parametrize("name", ("reference", *FAST_BACKENDS))
def test_kernel_equal_to_grid_is_full_attention(name: str) -> None:
    _skip_unless_runnable(name)
    q, k, v = _qkv((2, 3, 5, 7, 4), torch.float64, seed=3)
    out = _run(name, q, k, v, (5, 7), 0.6)
    full = F.scaled_dot_product_attention(
        *(t.reshape(2, 3, 35, 4) for t in (q, k, v)), scale=0.6
    ).reshape(q.shape)
    _assert_close(out, full, torch.float64, "out")


@pytest.mark.parametrize("name", ("reference", *FAST_BACKENDS))
@settings(max_examples=25, deadline=None)
@given(p=problems(dtypes=(torch.float64,)), data=st.data())
def test_keys_outside_the_window_do_not_matter(name: str, p: dict, data: st.DataObject) -> None:
    _skip_unless_runnable(name)
    _, _, H, W, _ = p["shape"]
    kh, kw = (p["ks"], p["ks"]) if isinstance(p["ks"], int) else p["ks"]
    i, j = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    q, k, v = _qkv(p["shape"], torch.float64, p["seed"])
    r0, c0 = window_starts(H, kh)[i], window_starts(W, kw)[j]
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[r0 : r0 + kh, c0 : c0 + kw] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, outside] = 50 * torch.randn_like(k2[:, :, outside])
    v2[:, :, outside] = 50 * torch.randn_like(v2[:, :, outside])
    a = _run(name, q, k, v, p["ks"], p["scale"])[:, :, i, j]
    b = _run(name, q, k2, v2, p["ks"], p["scale"])[:, :, i, j]
    _assert_close(b, a, torch.float64, "out")
    # and the keys inside are all it sees: shifting every value inside the window by 3 shifts
    # the output by exactly 3 (the weights are a convex combination over the window)
    v3 = v.clone()
    v3[:, :, r0 : r0 + kh, c0 : c0 + kw] += 3.0
    c = _run(name, q, k, v3, p["ks"], p["scale"])[:, :, i, j]
    _assert_close(c, a + 3.0, torch.float64, "out")


def _truncated_window_attention(q, k, v, kh: int, kw: int, scale: float) -> torch.Tensor:
    """The *other* operator (Liger-style): window [i - k//2, i + k//2] cut at the border."""
    B, heads, H, W, D = q.shape
    r = torch.arange(H)
    c = torch.arange(W)
    row_ok = (r[None, :] - r[:, None]).abs() <= kh // 2
    col_ok = (c[None, :] - c[:, None]).abs() <= kw // 2
    mask = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(H * W, H * W)
    flat = [t.reshape(B, heads, H * W, D) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat, attn_mask=mask, scale=scale).reshape(q.shape)


@pytest.mark.parametrize("name", ("reference", *FAST_BACKENDS))
def test_window_is_shifted_not_truncated(name: str) -> None:
    """A backend that truncated windows at the border would pass interior checks only."""
    _skip_unless_runnable(name)
    q, k, v = _qkv((1, 2, 13, 13, 8), torch.float64, seed=11)
    out = _run(name, q, k, v, 7, 1.0)
    truncated = _truncated_window_attention(q, k, v, 7, 7, 1.0)
    interior = (slice(None), slice(None), slice(3, 10), slice(3, 10))
    _assert_close(out[interior], truncated[interior], torch.float64, "out")  # same inside
    border_gap = (out - truncated).abs()[:, :, 0, 0].max().item()
    assert border_gap > 1e-2, f"border query matches the truncated window (gap {border_gap})"
    _assert_close(out, _oracle(q, k, v, 7, 1.0), torch.float64, "out")


@pytest.mark.parametrize("name", ("reference", *FAST_BACKENDS))
def test_symmetries(name: str) -> None:
    """Flipping an axis (odd k) flips the output; constant v gives constant output; permuting
    the batch permutes the output (docs/neighbourhood_attention.md §2, properties 4 and 6)."""
    _skip_unless_runnable(name)
    q, k, v = _qkv((3, 2, 9, 8, 5), torch.float64, seed=5)
    out = _run(name, q, k, v, (5, 3), 0.9)
    flipped = _run(name, *(t.flip(2) for t in (q, k, v)), (5, 3), 0.9)
    _assert_close(flipped, out.flip(2), torch.float64, "out")
    const = _run(name, q, k, torch.full_like(v, 1.25), (5, 3), 0.9)
    _assert_close(const, torch.full_like(v, 1.25), torch.float64, "out")
    perm = torch.tensor([2, 0, 1])
    _assert_close(
        _run(name, q[perm], k[perm], v[perm], (5, 3), 0.9), out[perm], torch.float64, "out"
    )


def test_default_scale_is_inverse_sqrt_head_dim() -> None:
    q, k, v = _qkv((1, 1, 6, 6, 16), torch.float64, seed=2)
    a = na2d(q, k, v, 3, backend="reference")
    b = na2d(q, k, v, 3, scale=0.25, backend="reference")
    _assert_close(a, b, torch.float64, "out")


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_non_contiguous_inputs(name: str) -> None:
    """MVAR's official layout is [B, H, W, heads, D]; a permuted view must work as is."""
    _skip_unless_runnable(name)
    base = _qkv((2, 7, 6, 3, 8), torch.float32, seed=4)
    q, k, v = (t.permute(0, 3, 1, 2, 4) for t in base)
    assert not q.is_contiguous()
    _assert_close(_run(name, q, k, v, 5, 1.0), _oracle(q, k, v, 5, 1.0), torch.float32, "out")


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _grads(name: str, q, k, v, ks, scale, g) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = na2d(*leaves, ks, scale, backend=name)
    return torch.autograd.grad(out, leaves, g)


def _reference_grads(q, k, v, ks, scale, g) -> tuple[torch.Tensor, ...]:
    return _grads("reference", q.double(), k.double(), v.double(), ks, scale, g.double())


@pytest.mark.parametrize("name", GRAD_BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(dtypes=(torch.float64, torch.float32)))
def test_gradients_match_reference(name: str, p: dict) -> None:
    _skip_unless_runnable(name, requires_grad=True)
    q, k, v = _qkv(p["shape"], p["dtype"], p["seed"])
    g = torch.randn(p["shape"], generator=torch.Generator().manual_seed(p["seed"] + 1))
    g = g.to(p["dtype"])
    got = _grads(name, q, k, v, p["ks"], p["scale"], g)
    want = _reference_grads(q, k, v, p["ks"], p["scale"], g)
    for gg, ww in zip(got, want):
        assert gg.dtype == p["dtype"]
        _assert_close(gg, ww, p["dtype"], "grad")


@pytest.mark.parametrize("name", GRAD_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "ks"), [((2, 2, 13, 13, 16), 7), ((1, 2, 16, 16, 64), 7), ((1, 1, 5, 8, 7), (4, 8))]
)
def test_gradients_match_reference_pinned(name: str, dtype: torch.dtype, shape, ks) -> None:
    _skip_unless_runnable(name, requires_grad=True)
    q, k, v = _qkv(shape, dtype, seed=9)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    for gg, ww in zip(_grads(name, q, k, v, ks, 1.0, g), _reference_grads(q, k, v, ks, 1.0, g)):
        _assert_close(gg, ww, dtype, "grad")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(mvar_head=True))
def test_numba_mvar_head_copy_matches_reference(p: dict) -> None:
    """The numba kernels' literal (kw = 7, D = 64) copy: forward, and gradients in fp32/fp64."""
    _skip_unless_runnable("numba", requires_grad=True)
    q, k, v = _qkv(p["shape"], p["dtype"], p["seed"])
    out = na2d(q, k, v, p["ks"], p["scale"], backend="numba")
    _assert_close(out, _oracle(q, k, v, p["ks"], p["scale"]), p["dtype"], "out")
    if p["dtype"] in (torch.float32, torch.float64):
        g = torch.randn(p["shape"], generator=torch.Generator().manual_seed(p["seed"] + 1))
        g = g.to(p["dtype"])
        got = _grads("numba", q, k, v, p["ks"], p["scale"], g)
        for gg, ww in zip(got, _reference_grads(q, k, v, p["ks"], p["scale"], g)):
            _assert_close(gg, ww, p["dtype"], "grad")


def test_numba_gradcheck_fp64() -> None:
    _skip_unless_runnable("numba", requires_grad=True)
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 4, 5, 3), torch.float64, seed=12))
    assert torch.autograd.gradcheck(
        lambda a, b, c: na2d(a, b, c, (3, 2), 0.7, backend="numba"), (q, k, v)
    )


# --------------------------------------------------------------------------------------------
# Backend selection and errors
# --------------------------------------------------------------------------------------------


def test_backend_checks_say_why() -> None:
    assert set(available_backends(CPU)) >= {"reference", "dense"}
    assert "cuda" not in available_backends(CPU)
    reason = backend_unavailable_reason("cuda", "cpu")
    assert isinstance(reason, str) and "CUDA" in reason
    if backend_unavailable_reason("flex", CPU) is None:
        flex_grad = backend_unavailable_reason("flex", CPU, requires_grad=True)
        assert flex_grad is not None and "backward on CPU" in flex_grad
    for name in BACKENDS:  # every check answers (None or a reason), never raises
        r = backend_unavailable_reason(name, CPU)
        assert r is None or (isinstance(r, str) and r)


def test_default_backend_on_cpu() -> None:
    expected = "numba" if backend_unavailable_reason("numba", CPU) is None else "dense"
    assert default_backend(CPU) == expected
    assert default_backend(CPU, requires_grad=True) == expected  # both have a backward
    q, k, v = _qkv((1, 2, 6, 5, 4), torch.float32, seed=8)
    _assert_close(na2d(q, k, v, 3), _oracle(q, k, v, 3, None), torch.float32, "out")


def test_flex_backward_on_cpu_is_a_clear_error() -> None:
    if backend_unavailable_reason("flex", CPU) is not None:
        pytest.skip(f"flex unavailable here: {backend_unavailable_reason('flex', CPU)}")
    q, k, v = (t.requires_grad_() for t in _qkv((1, 1, 4, 4, 2), torch.float32, seed=0))
    with pytest.raises(BackendUnavailableError, match="no backward on CPU"):
        na2d(q, k, v, 3, backend="flex")
    with torch.no_grad():  # inference with grad-requiring inputs is fine
        na2d(q, k, v, 3, backend="flex")


def _t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((_t(1, 1, 6, 6, 4),) * 3 + (7,), {}, ValueError, "exceeds the grid"),
        ((_t(1, 1, 6, 8, 4),) * 3 + ((3, 9),), {}, ValueError, "exceeds the grid"),
        ((_t(1, 1, 6, 6, 4),) * 3 + (0,), {}, ValueError, ">= 1"),
        ((_t(1, 1, 6, 6, 4),) * 3 + ((3, -1),), {}, ValueError, ">= 1"),
        ((_t(1, 6, 6, 4),) * 3 + (3,), {}, ValueError, "5 dims"),
        (
            (_t(1, 1, 6, 6, 4), _t(1, 1, 6, 5, 4), _t(1, 1, 6, 6, 4), 3),
            {},
            ValueError,
            "same shape",
        ),
        (
            (_t(1, 1, 6, 6, 4), _t(1, 1, 6, 6, 4, device="meta"), _t(1, 1, 6, 6, 4), 3),
            {},
            ValueError,
            "one device",
        ),
        (
            (_t(1, 1, 6, 6, 4), _t(1, 1, 6, 6, 4, dtype=torch.float64), _t(1, 1, 6, 6, 4), 3),
            {},
            TypeError,
            "one dtype",
        ),
        ((_t(1, 1, 6, 6, 4, dtype=torch.int64),) * 3 + (3,), {}, TypeError, "dtype"),
        (([[1.0]],) * 3 + (3,), {}, TypeError, "torch.Tensor"),
        ((_t(1, 1, 6, 6, 4),) * 3 + (3.0,), {}, TypeError, "kernel_size"),
        ((_t(1, 1, 6, 6, 4),) * 3 + (True,), {}, TypeError, "kernel_size"),
        ((_t(1, 1, 6, 6, 4),) * 3 + ((3, 3, 3),), {}, TypeError, "kernel_size"),
        ((_t(1, 1, 6, 6, 4),) * 3 + (3,), {"scale": float("nan")}, ValueError, "finite"),
        ((_t(1, 1, 6, 6, 4),) * 3 + (3,), {"scale": "1"}, TypeError, "scale"),
        ((_t(0, 1, 6, 6, 4),) * 3 + (3,), {}, ValueError, ">= 1"),
        (
            (_t(1, 1, 6, 6, 4),) * 3 + (3,),
            {"backend": "natten"},
            ValueError,
            "valid backends: reference, dense",
        ),
        (
            (_t(1, 1, 6, 6, 4),) * 3 + (3,),
            {"backend": "cuda"},
            BackendUnavailableError,
            "cannot run here",
        ),
    ],
)
def test_bad_input_raises_clear_errors(args, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        na2d(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# The CUDA kernels under numba's simulator (a separate process: NUMBA_ENABLE_CUDASIM is read at
# import time, and this process already imported numba without it)
# --------------------------------------------------------------------------------------------


def _run_simulator_check() -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "cudasim_na2d_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        check=False,
    )
    return proc, [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


@pytest.mark.cudasim
def test_cuda_kernels_under_simulator() -> None:
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    proc, results = _run_simulator_check()
    if proc.returncode != 0 and not any(r.get("ok") is False for r in results):
        # The process died without a wrong result (the simulator starts a Python thread per
        # CUDA thread; a machine short of threads or memory can kill it): one more try, and
        # the first failure stays in the message if the second one fails too.
        first = f"first attempt rc={proc.returncode}:\n{proc.stderr[-2000:]}"
        proc, results = _run_simulator_check()
    else:
        first = ""
    report = f"{first}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"simulator check failed (rc={proc.returncode}){report}"
    assert len(results) >= 5 and all(r["ok"] for r in results), report


# --------------------------------------------------------------------------------------------
# The benchmark's CSV converter (bench/to_csv.py)
# --------------------------------------------------------------------------------------------


def test_bench_csv_rows_carry_status_and_ratio_vs_dense(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_to_csv", REPO_ROOT / "bench" / "to_csv.py")
    to_csv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_csv)
    params = {"workload": "16x16", "B": 64, "heads": 16, "H": 16, "W": 16, "D": 64, "k": 7}
    data = {
        "machine_info": {"torch": "2.x", "git_sha": "abc123"},
        "benchmarks": [
            {"extra_info": {**params, "backend": "dense", "pass": "fwd"}, "stats": {"median": 0.4}},
            {"extra_info": {**params, "backend": "numba", "pass": "fwd"}, "stats": {"median": 0.1}},
            {
                "extra_info": {**params, "backend": "numba", "pass": "fwd+bwd"},
                "stats": {"median": 0.5},
            },
        ],
        "skipped": [{**params, "backend": "flex", "pass": "fwd+bwd", "status": "skipped: no bwd"}],
    }
    rows = {(r["backend"], r["pass"]): r for r in to_csv.rows_from_benchmark_json(data)}
    assert rows[("numba", "fwd")]["ratio_vs_dense"] == 4.0
    assert rows[("dense", "fwd")]["ratio_vs_dense"] == 1.0
    assert rows[("numba", "fwd+bwd")]["ratio_vs_dense"] == ""  # no dense row to compare with
    assert rows[("flex", "fwd+bwd")]["status"] == "skipped: no bwd"
    assert rows[("flex", "fwd+bwd")]["median_s"] == ""
    out = tmp_path / "na2d.csv"
    to_csv.write_csv(list(rows.values()), out)
    header = out.read_text().splitlines()[0].split(",")
    leading = [c for c in to_csv.LEADING_COLUMNS if c in header]
    assert header[: len(leading)] == leading
    assert leading[:11] == ["backend", "workload", "B", "heads", "H", "W", "D", "k", "pass",
                            "median_s", "ratio_vs_dense"]  # fmt: skip


def test_bench_csv_ratio_vs_fp32_pairs_rows_that_differ_only_in_dtype() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_to_csv", REPO_ROOT / "bench" / "to_csv.py")
    to_csv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_csv)

    def bench(median: float, **p: object) -> dict:
        # peak memory and the backend that ran are measurements: never part of the pairing key
        return {"extra_info": {"model": "mvar-d16", "B": 4, "peak_mib": median * 7, **p},
                "stats": {"median": median}}  # fmt: skip

    data = {
        "benchmarks": [
            bench(2.0, phase="tokens", backend="numba", dtype="fp32", na_calls="numba:32"),
            bench(1.0, phase="tokens", backend="numba", dtype="bf16", na_calls="numba:32"),
            bench(4.0, phase="tokens", backend="dense", dtype="fp32"),
            bench(3.0, phase="decode", dtype="bf16"),  # no fp32 decode row
            bench(6.0, phase="decode_kv", dtype="fp32", kv_cache="alive", kv_cache_bytes=9),
            bench(5.0, phase="decode_kv", dtype="fp32", kv_cache="freed", kv_cache_bytes=8),
        ],
    }
    rows = to_csv.rows_from_benchmark_json(data)
    r = {(x["phase"], x.get("backend"), x["dtype"], x.get("kv_cache")): x for x in rows}
    assert r[("tokens", "numba", "bf16", None)]["ratio_vs_fp32"] == 2.0
    assert r[("tokens", "numba", "fp32", None)]["ratio_vs_fp32"] == 1.0
    assert r[("tokens", "numba", "fp32", None)]["ratio_vs_dense"] == 2.0
    assert r[("decode", None, "bf16", None)]["ratio_vs_fp32"] == ""
    assert r[("decode_kv", None, "fp32", "freed")]["ratio_vs_kv_alive"] == 1.2
    assert "ratio_vs_dense" not in r[("decode", None, "bf16", None)]


def test_bench_csv_end_to_end_rows_sum_the_phases_of_one_run() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_to_csv", REPO_ROOT / "bench" / "to_csv.py")
    to_csv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_csv)

    def bench(median: float, **p: object) -> dict:
        return {"extra_info": {"B": 4, **p}, "stats": {"median": median}}

    vae = {"model": "vae-paper", "used_by": "var-d16 mvar-d16", "phase": "decode"}
    data = {
        "benchmarks": [
            bench(10.0, model="var-d16", phase="tokens", backend="none", dtype="fp32"),
            bench(4.0, model="var-d16", phase="tokens", backend="none", dtype="bf16"),
            bench(6.0, dtype="fp32", layout="contiguous", **vae),
            bench(5.0, dtype="fp32", layout="channels_last", **vae),  # not the default layout
            bench(3.0, dtype="bf16", layout="contiguous", **vae),
            bench(8.0, model="mvar-d16", phase="tokens", backend="numba", dtype="fp32", B=1),
        ],
    }
    rows = to_csv.rows_from_benchmark_json(data)
    e2e = {(r["model"], r["dtype"]): r for r in rows if r["phase"] == "end_to_end"}
    assert set(e2e) == {("var-d16", "fp32"), ("var-d16", "bf16")}  # mvar-d16 B=1 has no decode row
    assert e2e[("var-d16", "fp32")]["median_s"] == 16.0 and e2e[("var-d16", "bf16")]["median_s"] == 7.0
    assert e2e[("var-d16", "bf16")]["ratio_vs_fp32"] == round(16 / 7, 4)
    assert e2e[("var-d16", "fp32")]["status_note"].startswith("derived")
