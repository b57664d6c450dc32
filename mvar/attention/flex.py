"""The flex backend: PyTorch FlexAttention with a block mask built from the clamp rule.

The mask_mod below re-derives the window from flat indices with tensor ops (it is the one
place the rule is written independently of ``window_starts``, which makes it a useful cross
check). On CPU FlexAttention runs eagerly (it materialises the scores; forward only: torch
raises NotImplementedError for a backward on CPU, so the availability check refuses calls that
need gradients there). On CUDA the compiled kernel is used (``torch.compile(flex_attention)``,
compiled once per process on first use); that path is not exercised by the CPU test suite.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # torch < 2.5
    create_block_mask = flex_attention = None  # type: ignore[assignment]
    _IMPORT_ERROR = (
        f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({exc}); "
        "FlexAttention needs torch >= 2.5"
    )

_DEVICE_TYPES = ("cpu", "cuda")


def unavailable_reason(
    device: torch.device, dtype: torch.dtype | None = None, requires_grad: bool = False
) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type not in _DEVICE_TYPES:
        return f"FlexAttention here supports devices {_DEVICE_TYPES}, not {device.type!r}"
    if device.type == "cpu" and requires_grad:
        return (
            f"FlexAttention has no backward on CPU in torch {torch.__version__} (it raises "
            "NotImplementedError when an input requires grad); call it under torch.no_grad() "
            "or with inputs that do not require grad, or use backend='numba' or 'dense'"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def _neighborhood_mask_mod(H: int, W: int, kh: int, kw: int) -> Callable[..., torch.Tensor]:
    """mask_mod(b, h, q_idx, kv_idx) -> bool: is key kv_idx in query q_idx's window?"""

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_r, q_c = q_idx // W, q_idx % W
        k_r, k_c = kv_idx // W, kv_idx % W
        # start = clamp(i - k//2, 0, n - k): the window shifts inwards at the border
        # (docs/neighbourhood_attention.md §1), it is never truncated.
        r0 = torch.clamp(q_r - kh // 2, 0, H - kh)
        c0 = torch.clamp(q_c - kw // 2, 0, W - kw)
        return (k_r >= r0) & (k_r < r0 + kh) & (k_c >= c0) & (k_c < c0 + kw)

    return mask_mod


@functools.lru_cache(maxsize=64)
def block_mask(H: int, W: int, kh: int, kw: int, device: torch.device) -> Any:
    """The BlockMask for one (H, W, kh, kw, device), built once and cached."""
    N = H * W
    return create_block_mask(
        _neighborhood_mask_mod(H, W, kh, kw), B=None, H=None, Q_LEN=N, KV_LEN=N, device=device
    )


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention, dynamic=False)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    B, heads, H, W, D = q.shape
    N = H * W
    bm = block_mask(H, W, kh, kw, q.device)
    q4, k4, v4 = (t.reshape(B, heads, N, D) for t in (q, k, v))
    if q.device.type == "cuda":
        out = _compiled_flex()(q4, k4, v4, block_mask=bm, scale=scale)
    else:
        if not torch.is_grad_enabled():
            # torch refuses CPU inputs that merely *require* grad, even under no_grad; nothing
            # is recorded here, so detaching changes nothing but lets inference run.
            q4, k4, v4 = q4.detach(), k4.detach(), v4.detach()
        # Eager on CPU is deliberate (compiling costs seconds and gives no backward there);
        # torch warns once that it is unfused, which this module's docstring already states.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(q4, k4, v4, block_mask=bm, scale=scale)
    return out.reshape(B, heads, H, W, D)
