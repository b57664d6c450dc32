"""The reference backend: neighbourhood attention written out as a gather and a softmax.

This is the oracle of every test (NATTEN's habit: the reference is itself a backend). It is
written to be read, not to be fast: it materialises every query's kh*kw keys and values
([B, heads, H*W, kh*kw, D]), so keep it to small problems. Math runs in fp64 for fp64 inputs
and fp32 otherwise; the result comes back in the input dtype. Autograd differentiates it
directly (gather, einsum and softmax all have backward passes).
"""

from __future__ import annotations

import torch

from mvar.attention._common import compute_dtype, window_starts


def unavailable_reason(
    device: torch.device, dtype: torch.dtype | None = None, requires_grad: bool = False
) -> str | None:
    """Plain torch ops: runs wherever torch does, forward and backward."""
    return None


def window_key_index(H: int, W: int, kh: int, kw: int, device: torch.device) -> torch.Tensor:
    """[H*W, kh*kw] flat key indices of each query's window, row-major in the window.

    Query (i, j) sees rows start_h(i) .. start_h(i)+kh-1 and columns start_w(j) ..
    start_w(j)+kw-1 (docs/neighbourhood_attention.md §1, the clamp rule in ``window_starts``).
    """
    rows = torch.tensor(window_starts(H, kh), device=device)[:, None] + torch.arange(
        kh, device=device
    )  # [H, kh]
    cols = torch.tensor(window_starts(W, kw), device=device)[:, None] + torch.arange(
        kw, device=device
    )  # [W, kw]
    # key (r, c) of query (i, j) at window slot (a, b) has flat index rows[i, a] * W + cols[j, b]
    flat = rows[:, None, :, None] * W + cols[None, :, None, :]  # [H, W, kh, kw]
    return flat.reshape(H * W, kh * kw)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    """out[b, h, i, j] = softmax_over_window(scale * q[b, h, i, j] . k[window]) @ v[window]."""
    B, heads, H, W, D = q.shape
    ct = compute_dtype(q.dtype)
    idx = window_key_index(H, W, kh, kw, q.device)  # [N, K]
    N = idx.shape[0]
    q_n = q.to(ct).reshape(B, heads, N, D)
    k_n = k.to(ct).reshape(B, heads, N, D)
    v_n = v.to(ct).reshape(B, heads, N, D)
    k_win = k_n[:, :, idx]  # [B, heads, N, K, D]: the keys each query sees
    v_win = v_n[:, :, idx]
    scores = torch.einsum("bhnd,bhnkd->bhnk", q_n, k_win) * scale
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhnk,bhnkd->bhnd", probs, v_win)
    return out.reshape(B, heads, H, W, D).to(q.dtype)
