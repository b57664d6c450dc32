"""Neighbourhood attention on a CUDA device: the ``cuda`` backend (numba.cuda kernels through
torch), and ``dense`` / ``flex`` (compiled) on CUDA, against the fp64 reference.

Skipped without a CUDA device (the CPU suite covers the same kernels under numba's simulator,
``tests/cudasim_na2d_check.py``, and compiles them to PTX, ``tests/test_attention_cuda_ptx.py``).
On a GPU machine ``python -m repro.gpu_check`` runs this file with
``MVAR_REQUIRE_CUDA_BACKEND=1``: then a ``cuda`` backend that cannot run there (numba-cuda
missing, no driver for numba) is a failure, not a skip, so a GPU run cannot pass by testing
nothing.

The oracle and the tolerances are the CPU suite's (``tests/test_attention.py``: the fp64
reference on the same rounded inputs, ``mvar.attention.TOLERANCES`` per input dtype); here
they are applied to results computed on the device and copied back. Beyond the CPU suite:
MVAR's full-size workloads (B = 64, 16 heads, D = 64), the external-stream launch (torch's
current stream, ordered after a producer on a side stream), determinism, and the fp64 refusal.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from mvar.attention import BackendUnavailableError, backend_unavailable_reason, na2d
from tests.test_attention import PINNED, _assert_close, _oracle, _qkv, problems

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)

CUDA = torch.device("cuda")
REQUIRE_CUDA_BACKEND = os.environ.get("MVAR_REQUIRE_CUDA_BACKEND", "") not in ("", "0")
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the cuda backend's inputs
ALL_DTYPES = (torch.float64, *CUDA_DTYPES)
# MVAR's two neighbourhood scales at full head size (docs/mvar.md §2): what flex compiles for
# in practice (each new shape and dtype is a recompile, so the flex tests stay on these).
MVAR_SHAPES = [((2, 2, 13, 13, 64), 7), ((2, 2, 16, 16, 64), 7)]


def _require(name: str, requires_grad: bool = False, dtype: torch.dtype | None = None) -> None:
    reason = backend_unavailable_reason(name, CUDA, dtype, requires_grad=requires_grad)
    if reason is None:
        return
    if name == "cuda" and REQUIRE_CUDA_BACKEND:
        pytest.fail(f"the cuda backend cannot run on this GPU machine: {reason}")
    pytest.skip(f"backend {name!r} unavailable here: {reason}")


def _dev(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(CUDA) for t in ts]


def _forward(name: str, q, k, v, ks, scale) -> torch.Tensor:
    with torch.no_grad():
        out = na2d(*_dev(q, k, v), ks, scale, backend=name)
    assert out.device.type == "cuda" and out.dtype == q.dtype and out.shape == q.shape
    return out.cpu()


def _grads(name: str, q, k, v, ks, scale, g) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().to(CUDA).requires_grad_() for t in (q, k, v)]
    out = na2d(*leaves, ks, scale, backend=name)
    return tuple(x.cpu() for x in torch.autograd.grad(out, leaves, g.to(CUDA)))


def _reference_grads(q, k, v, ks, scale, g) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = na2d(*leaves, ks, scale, backend="reference")
    return torch.autograd.grad(out, leaves, g.double())


# --- the cuda backend: forward and backward, every input dtype, awkward shapes ---------------


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "ks"), PINNED)
def test_cuda_forward_matches_reference_pinned(dtype: torch.dtype, shape, ks) -> None:
    _require("cuda", dtype=dtype)
    q, k, v = _qkv(shape, dtype, seed=7)
    for scale in (None, 1.0):
        _assert_close(_forward("cuda", q, k, v, ks, scale), _oracle(q, k, v, ks, scale), dtype,
                      "out")  # fmt: skip


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "ks"),
    [((2, 2, 13, 13, 16), 7), ((1, 2, 16, 16, 64), 7), ((1, 1, 5, 8, 7), (4, 8)),
     ((1, 3, 6, 11, 33), (4, 6)), ((1, 1, 1, 1, 5), 1), ((1, 1, 9, 9, 70), (9, 9))],
)  # fmt: skip
def test_cuda_gradients_match_reference_pinned(dtype: torch.dtype, shape, ks) -> None:
    """(9, 9) windows: 81 keys > the 64-thread block, through the chunked online softmax;
    D = 70 > 64 through the strided loops."""
    _require("cuda", requires_grad=True, dtype=dtype)
    q, k, v = _qkv(shape, dtype, seed=9)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    got = _grads("cuda", q, k, v, ks, 1.0, g)
    for gg, ww in zip(got, _reference_grads(q, k, v, ks, 1.0, g)):
        assert gg.dtype == dtype
        _assert_close(gg, ww, dtype, "grad")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(dtypes=CUDA_DTYPES))
def test_cuda_matches_reference_random(p: dict) -> None:
    """Random shapes, kernels (odd, even, rectangular, k = side), scales and dtypes; forward
    always, gradients too."""
    _require("cuda", requires_grad=True, dtype=p["dtype"])
    q, k, v = _qkv(p["shape"], p["dtype"], p["seed"])
    _assert_close(_forward("cuda", q, k, v, p["ks"], p["scale"]),
                  _oracle(q, k, v, p["ks"], p["scale"]), p["dtype"], "out")  # fmt: skip
    g = torch.randn(p["shape"], generator=torch.Generator().manual_seed(p["seed"] + 1))
    g = g.to(p["dtype"])
    got = _grads("cuda", q, k, v, p["ks"], p["scale"], g)
    for gg, ww in zip(got, _reference_grads(q, k, v, p["ks"], p["scale"], g)):
        _assert_close(gg, ww, p["dtype"], "grad")


@pytest.mark.parametrize(("B", "n"), [(64, 13), (64, 16), (2, 16)])
def test_cuda_at_mvar_size(B: int, n: int) -> None:
    """Table 2's workloads (B = 64 is batch 32 with guidance; 16 heads, D = 64, k = 7): the
    index arithmetic at full grid size. The oracle runs on the device in fp64 (the gather
    is ~0.8 GB there), fp32 inputs, forward and backward."""
    _require("cuda", requires_grad=True)
    shape = (B, 16, n, n, 64)
    q, k, v, g = _dev(*_qkv(shape, torch.float32, seed=n), torch.randn(shape))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = na2d(*leaves, 7, 1.0, backend="cuda")
    got = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = na2d(*ref_leaves, 7, 1.0, backend="reference")
    want = torch.autograd.grad(ref, ref_leaves, g.double())
    _assert_close(out, ref, torch.float32, "out")
    for gg, ww in zip(got, want):
        _assert_close(gg, ww, torch.float32, "grad")


def test_cuda_non_contiguous_inputs() -> None:
    """MVAR's official layout is [B, H, W, heads, D]; a permuted view must work as is."""
    _require("cuda", requires_grad=True)
    base = _qkv((2, 7, 6, 3, 8), torch.float32, seed=4)
    q, k, v = (t.to(CUDA).permute(0, 3, 1, 2, 4) for t in base)
    assert not q.is_contiguous()
    out = na2d(q, k, v, 5, 1.0, backend="cuda").cpu()
    _assert_close(out, _oracle(q.cpu(), k.cpu(), v.cpu(), 5, 1.0), torch.float32, "out")


def test_cuda_runs_on_torchs_current_stream() -> None:
    """The kernels launch on torch's current stream (``external_stream``): inputs produced
    by a long op queued just before on a side stream must be read after it finishes, and the
    output must be ready for the next op on that stream, with no synchronisation by hand."""
    _require("cuda")
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device=CUDA)
    side.wait_stream(torch.cuda.current_stream())  # a is made on the default stream
    shape = (2, 4, 16, 16, 64)
    with torch.cuda.stream(side):
        for _ in range(4):  # milliseconds of queued work before q, k, v are final
            a = a @ a * 1e-2
        base = a[:128].reshape(-1)[: 3 * 2 * 4 * 16 * 16 * 64].reshape(3, *shape)
        q, k, v = base[0] * 0 + 1.5, base[1] * 0 + 0.5, base[2] * 0 + torch.arange(64, device=CUDA)
        out = na2d(q, k, v, 7, 1.0, backend="cuda")
        total = out.sum()  # consumes the output on the same stream
    side.synchronize()
    # constant q and k: uniform weights; v depends on d only, so out[..., d] = d everywhere
    want = torch.arange(64, dtype=torch.float32).expand(shape)
    _assert_close(out.cpu(), want, torch.float32, "out")
    assert abs(total.item() - float(want.sum())) < 1e-3 * float(want.sum())


def test_cuda_is_deterministic() -> None:
    """No atomics: the same inputs give bitwise the same outputs and gradients."""
    _require("cuda", requires_grad=True)
    q, k, v = _dev(*_qkv((2, 3, 13, 13, 64), torch.float32, seed=3))
    g = torch.randn_like(q)

    def once() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = na2d(*leaves, 7, 1.0, backend="cuda")
        return [out.detach(), *torch.autograd.grad(out, leaves, g)]

    for x, y in zip(once(), once()):
        assert torch.equal(x, y)


def test_cuda_refuses_fp64_with_a_reason() -> None:
    _require("cuda")
    q = torch.zeros(1, 1, 4, 4, 2, dtype=torch.float64, device=CUDA)
    with pytest.raises(BackendUnavailableError, match="fp64"):
        na2d(q, q, q, 3, backend="cuda")


def test_auto_backend_on_cuda_is_cuda() -> None:
    """``backend=None`` on CUDA tensors picks the cuda kernel first (AUTO_ORDER)."""
    _require("cuda", requires_grad=True)
    from mvar.attention import default_backend

    assert default_backend(CUDA) == "cuda"
    assert default_backend(CUDA, torch.float16, requires_grad=True) == "cuda"


# --- dense and flex (compiled) on CUDA -------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "ks"), PINNED[:3] + PINNED[5:])
def test_dense_on_cuda_matches_reference(dtype: torch.dtype, shape, ks) -> None:
    _require("dense")
    q, k, v = _qkv(shape, dtype, seed=7)
    _assert_close(_forward("dense", q, k, v, ks, 1.0), _oracle(q, k, v, ks, 1.0), dtype, "out")
    if dtype in (torch.float64, torch.float32):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(dtype)
        for gg, ww in zip(_grads("dense", q, k, v, ks, 1.0, g),
                          _reference_grads(q, k, v, ks, 1.0, g)):  # fmt: skip
            _assert_close(gg, ww, dtype, "grad")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(("shape", "ks"), MVAR_SHAPES)
def test_flex_compiled_on_cuda_matches_reference(dtype: torch.dtype, shape, ks) -> None:
    """FlexAttention compiled on CUDA (the CPU suite runs it eagerly only); backward in fp32."""
    _require("flex")
    q, k, v = _qkv(shape, dtype, seed=7)
    _assert_close(_forward("flex", q, k, v, ks, 1.0), _oracle(q, k, v, ks, 1.0), dtype, "out")
    if dtype == torch.float32:
        g = torch.randn(shape, generator=torch.Generator().manual_seed(10))
        for gg, ww in zip(_grads("flex", q, k, v, ks, 1.0, g),
                          _reference_grads(q, k, v, ks, 1.0, g)):  # fmt: skip
            _assert_close(gg, ww, dtype, "grad")
