"""The dense backend: ``scaled_dot_product_attention`` over the whole grid with a boolean mask.

What a user writes with stock PyTorch: correct, differentiable on every device, but it does
the FLOPs of full attention (N^2 per head instead of N*kh*kw; 5.2x more at 16x16 with k = 7,
docs/neighbourhood_attention.md §5). The [N, N] mask is built once per (H, W, kh, kw, device) and cached.

Non-finite keys or values stay local, as in the reference and the fused kernels: SDPA multiplies
every query with every key before masking (NaN + -inf = NaN) and every probability with every
value (0 * NaN = NaN), so one NaN key would poison the whole head. We hand SDPA keys and values
with non-finite entries zeroed and then set to NaN exactly the outputs of queries whose window
holds a non-finite key or value (one [N, N] x [N] product per head, no host sync).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mvar.attention._common import window_starts


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def unavailable_reason(
    device: torch.device, dtype: torch.dtype | None = None, requires_grad: bool = False
) -> str | None:
    """SDPA runs (forward and backward) wherever torch does."""
    return None


@functools.lru_cache(maxsize=64)
def neighborhood_mask(H: int, W: int, kh: int, kw: int, device: torch.device) -> torch.Tensor:
    """[H*W, H*W] bool, True where query (row) may attend to key (column). Cached.

    Built from the same clamp rule as every backend (``window_starts``); callers must not
    modify the returned tensor (it is shared).
    """
    rs = torch.tensor(window_starts(H, kh), device=device)  # [H] window start per query row
    cs = torch.tensor(window_starts(W, kw), device=device)  # [W]
    r = torch.arange(H, device=device)
    c = torch.arange(W, device=device)
    row_ok = (r[None, :] >= rs[:, None]) & (r[None, :] < rs[:, None] + kh)  # [H query, H key]
    col_ok = (c[None, :] >= cs[:, None]) & (c[None, :] < cs[:, None] + kw)  # [W query, W key]
    mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # [Hq, Wq, Hk, Wk]
    return mask.reshape(H * W, H * W)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    B, heads, H, W, D = q.shape
    # Under FakeTensorMode (the profiler's memory estimates) the mask is a fake tensor: build
    # it afresh rather than caching it, so that fake and real masks never meet in the cache.
    build = neighborhood_mask.__wrapped__ if _is_fake(q) else neighborhood_mask
    mask = build(H, W, kh, kw, q.device)
    N = H * W
    k_, v_ = k.reshape(B, heads, N, D), v.reshape(B, heads, N, D)
    k_ok, v_ok = torch.isfinite(k_), torch.isfinite(v_)
    out = F.scaled_dot_product_attention(
        q.reshape(B, heads, N, D),
        torch.where(k_ok, k_, torch.zeros_like(k_)),
        torch.where(v_ok, v_, torch.zeros_like(v_)),
        attn_mask=mask,
        scale=scale,
    )
    bad_key = ~(k_ok.all(-1) & v_ok.all(-1))  # [B, heads, N]
    # queries whose window holds a bad key: mask [Nq, Nk] @ bad [Nk] > 0
    hit = (bad_key.to(torch.float32) @ mask.to(torch.float32).T) > 0  # [B, heads, Nq]
    out = torch.where(hit[..., None], torch.full_like(out, float("nan")), out)
    return out.reshape(B, heads, H, W, D)
