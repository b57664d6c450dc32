"""Transformer blocks shared by VAR (``baselines/var.py``) and MVAR (``mvar/model.py``).

Both models are the same network (docs/var.md §2: AdaLN pre-norm blocks, cosine attention, one
class-conditioned head); they differ only in *which keys each query may see*. So a block never
decides that: its attention calls an ``attend(q, k, v)`` function handed in by the model, which
is where VAR's block-causal mask and KV cache, and MVAR's block-diagonal scales and 2-D
neighbourhood windows, live.

Parameter and buffer names follow the official code so its checkpoints load with
``strict=True``. The transformer both models subclass is ``mvar.transformer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvar.attention import na2d
from mvar.config import ModelConfig

# attend(q_BHlc, k_BHLc, v_BHLc) -> o_BHlc.  q and k arrive l2-normalised, q already multiplied
# by exp(scale_mul) (cosine attention, docs/var.md §2.4).
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class DropPath(nn.Module):
    """Stochastic depth on the residual branch, per sample; identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x_BlC: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x_BlC)))


# ---------------------------------------------------------------------------------------------
# Attention cores: small stateless modules so that profilers can hook every attention call
# (``mvar.profiling.flops`` counts q·kᵀ pairs on their inputs, by these forward signatures'
# argument names) and so the pattern is a swapped module.
# ---------------------------------------------------------------------------------------------


class DenseAttention(nn.Module):
    """softmax(scale·q·kᵀ + attn_bias)·v through SDPA, as the official code runs it.

    ``attn_bias`` is additive (0 / -inf), broadcastable to (B, H, l, L), or None for all pairs.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(
        self, q_BHlc: Tensor, k_BHLc: Tensor, v_BHLc: Tensor, attn_bias: Tensor | None = None
    ) -> Tensor:
        if attn_bias is not None:
            attn_bias = attn_bias.to(q_BHlc.dtype)
        return F.scaled_dot_product_attention(
            q_BHlc, k_BHLc, v_BHLc, attn_mask=attn_bias, scale=self.scale
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class NeighbourhoodAttention(nn.Module):
    """2-D neighbourhood attention on one scale's pn×pn token map (docs/mvar.md §2, NATTEN's window
    rule), through :func:`mvar.attention.na2d`. Tokens are row-major inside a scale."""

    def __init__(self, kernel_size: int, scale: float, backend: str | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.scale = scale
        self.backend = backend

    def forward(
        self, q_BHlc: Tensor, k_BHlc: Tensor, v_BHlc: Tensor, grid_hw: tuple[int, int]
    ) -> Tensor:
        B, H, l, c = q_BHlc.shape
        h, w = grid_hw
        if h * w != l:
            raise ValueError(f"grid {h}x{w} does not hold the {l} tokens of this scale")
        q, k, v = (t.reshape(B, H, h, w, c) for t in (q_BHlc, k_BHlc, v_BHlc))
        if not q.dtype == k.dtype == v.dtype:
            # Under autocast, cosine attention's q (and on CUDA k) leave the normalisation in
            # fp32 (norm runs in fp32; the temperature is an fp32 parameter) while v stays in
            # the autocast dtype. SDPA, on the dense scales, casts all three to the autocast
            # dtype; the neighbourhood scales do the same (na2d takes one dtype).
            dev = q.device.type
            dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                  else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))  # fmt: skip
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        o = na2d(q, k, v, self.kernel_size, scale=self.scale, backend=self.backend)
        return o.reshape(B, H, l, c)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, scale={self.scale:g}, backend={self.backend}"


class SelfAttention(nn.Module):
    """Multi-head cosine self-attention of VAR (docs/var.md §2.4); the pattern comes from ``attend``."""

    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # Learned per-head temperature, initialised to 4 and capped at 100 (docs/var.md §2.4).
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    @property
    def softmax_scale(self) -> float:
        # Cosine attention already carries its temperature in q (scale 1); the plain variant
        # uses the official 0.25/sqrt(c).
        return 1.0 if self.attn_l2_norm else 0.25 / math.sqrt(self.head_dim)

    def qkv(self, x_BlC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, l, _ = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each BHlc
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x_BlC: Tensor, attend: AttendFn) -> Tensor:
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC)
        o_BHlc = attend(q, k, v)
        return self.proj(o_BHlc.transpose(1, 2).reshape(B, l, C))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block with adaptive LayerNorm from the class condition (docs/var.md §2.3)."""

    def __init__(self, cfg: ModelConfig, drop_path: float) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:  # only the 512 px d36 model shares one AdaLN (docs/var.md §2)
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BlC: Tensor, cond_BD: Tensor, attend: AttendFn) -> Tensor:
        if self.shared_aln:
            ada = self.ada_gss + cond_BD  # cond_BD is already SiLU+Linear'd to (B,1,6,C)
        else:
            ada = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        # Chunk order (γ1, γ2, s1, s2, b1, b2) is VAR's, not DiT's.
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        h = self.ln_wo_grad(x_BlC).mul(scale1.add(1)).add_(shift1)
        x_BlC = x_BlC + self.drop_path(self.attn(h, attend).mul_(gamma1))
        h = self.ln_wo_grad(x_BlC).mul(scale2.add(1)).add_(shift2)
        return x_BlC + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BlC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: Tensor) -> Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)
