"""2-D neighbourhood attention (NATTEN semantics): one function, five backends.

``na2d(q, k, v, kernel_size, scale=None, backend=None)`` with q, k, v of shape
[B, heads, H, W, D] returns softmax(scale * q k^T over each query's window) v in the same shape
and dtype. Along an axis of length n with kernel k <= n, query i sees keys start(i) ..
start(i)+k-1 with start(i) = clamp(i - k//2, 0, n - k): every query sees exactly kh*kw keys,
including itself, and windows shift inwards at the border rather than being truncated
(``docs/neighbourhood_attention.md`` §1). MVAR calls ``na2d(q, k, v, 7, scale=1.0)`` on its
13x13 and 16x16 scales.

Backends (``BACKENDS``), each with a "can it run here, and if not, why" check
(``backend_unavailable_reason``):

- ``reference``: gather + softmax in fp32/fp64, the oracle of the tests (small problems only);
- ``dense``: SDPA with a cached boolean mask (full-attention FLOPs, any device, backward);
- ``flex``: FlexAttention with a clamp-rule block mask (CPU: eager, forward only);
- ``numba``: fused CPU kernels, forward and backward;
- ``cuda``: numba.cuda kernels on torch's current stream, forward and backward, fp32.

``backend=None`` takes the first runnable backend of ``AUTO_ORDER`` for the tensors' device
(CPU: numba, then dense; CUDA: cuda, then flex, then dense), skipping backends without a
backward when autograd is recording, and logs the choice once per situation.
"""

from __future__ import annotations

import logging

import torch

from mvar.attention._common import (
    AUTO_ORDER,
    BACKENDS,
    FALLBACK_ORDER,
    TOLERANCES,
    BackendUnavailableError,
    Tolerance,
    as_device,
    inverse_windows,
    load_backend,
    needs_grad,
    normalize_kernel_size,
    tolerance,
    validate,
    window_starts,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "TOLERANCES",
    "BackendUnavailableError",
    "Tolerance",
    "available_backends",
    "backends_used",
    "reset_backends_used",
    "backend_unavailable_reason",
    "default_backend",
    "inverse_windows",
    "na2d",
    "normalize_kernel_size",
    "tolerance",
    "window_starts",
]

_logged_choices: set[tuple[str, bool, str]] = set()
# How many na2d calls each backend served in this process: what actually ran, recorded with
# results (``mvar.generate`` checks it against the backend its sample folder is keyed by).
_calls_per_backend: dict[str, int] = {}


def backends_used() -> dict[str, int]:
    """{backend name: na2d calls} since the process started or :func:`reset_backends_used`."""
    return dict(_calls_per_backend)


def reset_backends_used() -> None:
    _calls_per_backend.clear()


def backend_unavailable_reason(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    requires_grad: bool = False,
) -> str | None:
    """Why backend ``name`` cannot run here, or None if it can.

    ``device`` is where the tensors live; ``dtype`` (optional) their dtype; ``requires_grad``
    whether a backward pass will be needed. Raises ValueError for an unknown name.
    """
    dev = as_device(device)
    return load_backend(name).unavailable_reason(dev, dtype, requires_grad)


def available_backends(
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    requires_grad: bool = False,
) -> list[str]:
    """Names of the backends that can run on ``device`` (in ``BACKENDS`` order)."""
    return [
        name
        for name in BACKENDS
        if backend_unavailable_reason(name, device, dtype, requires_grad) is None
    ]


def default_backend(
    device: torch.device | str, dtype: torch.dtype | None = None, requires_grad: bool = False
) -> str:
    """What ``backend=None`` picks: the first runnable backend of ``AUTO_ORDER`` for the device
    type (then ``dense``, then ``reference``, which run anywhere torch does)."""
    dev = as_device(device)
    order = AUTO_ORDER.get(dev.type, ()) + FALLBACK_ORDER
    skipped: list[str] = []
    for name in order:
        reason = backend_unavailable_reason(name, dev, dtype, requires_grad)
        if reason is None:
            key = (dev.type, requires_grad, name)
            if key not in _logged_choices:
                _logged_choices.add(key)
                # Falling back from the preferred backend changes speed (and the last bits of
                # results): a WARNING that names what was wanted, why not, and what runs.
                if skipped:
                    logger.warning(
                        "na2d on %s (grad=%s): wanted %s, using %r instead",
                        dev.type, requires_grad, "; then ".join(skipped), name,
                    )  # fmt: skip
                else:
                    logger.info("na2d on %s (grad=%s) uses %r", dev.type, requires_grad, name)
            return name
        skipped.append(f"{name} ({reason})")
    raise BackendUnavailableError(  # unreachable while 'reference' runs everywhere
        f"no na2d backend can run on {dev}: {'; '.join(skipped)}"
    )


def na2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, int],
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """2-D neighbourhood attention on [B, heads, H, W, D] tensors.

    Args:
        q, k, v: same shape, device and floating dtype (fp16, bf16, fp32, fp64).
        kernel_size: ``k`` or ``(kh, kw)`` with 1 <= kh <= H and 1 <= kw <= W (odd or even).
        scale: softmax scale; ``None`` means ``D ** -0.5`` (MVAR passes 1.0).
        backend: one of ``BACKENDS`` or None for the fastest runnable one on this device.

    Returns:
        [B, heads, H, W, D] in the inputs' dtype; differentiable with every backend except
        ``flex`` on CPU.

    Raises:
        TypeError: non-tensor inputs, unsupported or mismatched dtypes, a non-integer kernel
            size or scale.
        ValueError: wrong rank or shapes, mismatched devices, kernel size < 1 or larger than
            the grid, a non-finite scale, an unknown backend.
        BackendUnavailableError (a ValueError): the backend cannot run here; says why.
    """
    problem = validate(q, k, v, kernel_size, scale)
    grad = needs_grad(q, k, v)
    if backend is None:
        name = default_backend(problem.device, problem.dtype, grad)
    else:
        name = backend
        reason = backend_unavailable_reason(name, problem.device, problem.dtype, grad)
        if reason is not None:
            raise BackendUnavailableError(f"na2d backend {name!r} cannot run here: {reason}")
    _calls_per_backend[name] = _calls_per_backend.get(name, 0) + 1
    return load_backend(name).forward(q, k, v, problem.kh, problem.kw, problem.scale)
