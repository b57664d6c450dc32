"""Transformer blocks shared by VAR (``baselines/var.py``) and MVAR (``mvar/model.py``).

Both models are the same network (docs/var.md §2: AdaLN pre-norm blocks, cosine attention, one
class-conditioned head); they differ only in *which keys each query may see*. So a block never
decides that: its attention calls an ``attend(q, k, v)`` function handed in by the model, which
is where VAR's block-causal mask and KV cache, and MVAR's block-diagonal scales and 2-D
neighbourhood windows, live.

Parameter and buffer names follow the official code so its checkpoints load with
``strict=True``; ``ScaleARTransformer`` registers them in the official order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvar.attention import na2d
from mvar.config import ModelConfig
from mvar.sampling import SampleOutput, ScaleStep, sample_scales

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
# (``mvar.profiling`` counts q·kᵀ pairs on their inputs) and so the pattern is a swapped module.
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


# ---------------------------------------------------------------------------------------------
# The scale-wise AR transformer both models subclass: embeddings, blocks, head, init.
# ---------------------------------------------------------------------------------------------


def scale_ids(patch_nums: Sequence[int]) -> Tensor:
    """(L,) int64: the scale index of every token of the pyramid."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])


class ScaleARTransformer(nn.Module):
    """What VAR and MVAR share. Subclasses set the attention pattern: they implement
    ``build_attn_bias`` (the ``attn_bias_for_masking`` buffer, rebuilt from the geometry on
    every load — a checkpoint's copy is never trusted, docs/mvar.md §3), ``forward`` (teacher
    forcing) and ``sampling_step`` (one scale's forward while sampling).
    """

    #: Whether ``cfg == 1.0`` still runs the unconditional half (VAR) or disables guidance
    #: altogether (MVAR). The official samplers differ here; see ``mvar.sampling``.
    CFG_ONE_RUNS_UNCONDITIONAL: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        self.C, self.L, self.V, self.Cvae = C, L, cfg.vocab_size, cfg.Cvae
        self.num_classes = cfg.num_classes
        self.patch_nums = tuple(cfg.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = cfg.begin_ends
        self.cond_drop_rate = 0.1  # class dropout for CFG, training only (docs/var.md §4)

        # Registration order reproduces the official state-dict order.
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # + the null class for CFG
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        if cfg.shared_aln:
            self.shared_ada_lin: nn.Module = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        else:
            self.shared_ada_lin = nn.Identity()
        # Stochastic depth grows linearly over the blocks (docs/var.md §2); plain floats so that
        # building on the meta device works.
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, dpr[i]) for i in range(cfg.depth))
        self.register_buffer("lvl_1L", scale_ids(self.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", self.build_attn_bias())
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        softmax_scale = self.blocks[0].attn.softmax_scale if cfg.depth else 1.0
        self.dense_attention = DenseAttention(softmax_scale)
        self.register_load_state_dict_post_hook(ScaleARTransformer._rebuild_mask)

    # -- masks ------------------------------------------------------------------------------
    def build_attn_bias(self) -> Tensor:  # (1, 1, L, L) additive 0 / -inf
        raise NotImplementedError

    def scale_mask(self, sees: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(1, 1, L, L) additive mask: 0 where ``sees(query scale, key scale)``, else -inf."""
        d = scale_ids(self.patch_nums)
        bias = torch.where(sees(d.view(-1, 1), d.view(1, -1)), 0.0, -torch.inf)
        return bias.view(1, 1, self.L, self.L)

    @staticmethod
    def _rebuild_mask(module: nn.Module, incompatible: Any) -> None:
        # The mask is a function of the geometry; a loaded copy can be wrong (the official
        # MVAR fine-tunes inherited VAR's block-causal one, docs/mvar.md §3). The key stays in the
        # state dict (so VAR and MVAR files stay interchangeable) but its values are replaced
        # after every load; a shape mismatch still fails the load, since it means another
        # geometry.
        assert isinstance(module, ScaleARTransformer)
        if module.attn_bias_for_masking.device.type != "meta":
            with torch.no_grad():
                module.attn_bias_for_masking.copy_(module.build_attn_bias())

    # -- embeddings and head ----------------------------------------------------------------
    def class_condition(self, label_B: Tensor) -> Tensor:
        """cond_BD = class_emb[label] with the official 10% null-class dropout in training
        only (the official forward also drops labels in eval mode; we do not)."""
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(label_B.shape[0], device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        return self.class_emb(label_B)

    def lvl_pos(self) -> Tensor:
        """(1, L, C) level + absolute position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def embed_scale(
        self, si: int, cond_BD: Tensor, x_BlCv: Tensor | None, lvl_pos: Tensor | None = None
    ) -> Tensor:
        """Token embeddings of scale ``si``: the start tokens (class embedding + pos_start) for
        si = 0, else word_embed of the scale's input ``x_BlCv`` (B, pn², Cvae), the area-down
        of the cumulative f̂ (docs/var.md §1); plus the level and position embedding."""
        lvl_pos = self.lvl_pos() if lvl_pos is None else lvl_pos
        bg, ed = self.begin_ends[si]
        if si == 0:
            x = cond_BD.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start
        else:
            assert x_BlCv is not None
            x = self.word_embed(x_BlCv.float())
        return x + lvl_pos[:, bg:ed]

    def embed_inputs(self, cond_BD: Tensor, x_BLCv: Tensor, scales: Sequence[int]) -> Tensor:
        """Token embeddings of the listed scales, concatenated (teacher forcing)."""
        lvl_pos = self.lvl_pos()
        parts = []
        for si in scales:
            bg, ed = self.begin_ends[si]
            # x_BLCv holds L - first_l rows: token t of the pyramid sits at row t - first_l.
            x = None if si == 0 else x_BLCv[:, bg - self.first_l : ed - self.first_l]
            parts.append(self.embed_scale(si, cond_BD, x, lvl_pos))
        return torch.cat(parts, dim=1)

    def get_logits(self, h_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        return self.head(self.head_nm(h_BlC.float(), cond_BD).float()).float()

    def run_blocks(self, x_BlC: Tensor, cond_BD: Tensor, attends: Sequence[AttendFn]) -> Tensor:
        cond = self.shared_ada_lin(cond_BD)
        for block, attend in zip(self.blocks, attends, strict=True):
            x_BlC = block(x_BlC, cond, attend)
        return x_BlC

    # -- sampling ---------------------------------------------------------------------------
    def sampling_step(self) -> tuple[ScaleStep, Callable[[], int]]:
        """For one sampling call: the forward of one scale's tokens, and a function that gives
        the bytes of KV cache held at the end (0 without a cache)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        vae: nn.Module,
        label_B: Tensor,
        *,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        g_seed: int | None = None,
        more_smooth: bool = False,
        decode: bool = True,
        record_logits: bool = False,
    ) -> SampleOutput:
        """Sample B images of classes ``label_B`` (docs/var.md §3, docs/mvar.md §5). At ``cfg == 1.0``
        the unconditional half still runs when ``CFG_ONE_RUNS_UNCONDITIONAL`` (VAR); otherwise
        only the conditional rows run, with no guidance (MVAR), as in the official samplers."""
        step, kv_cache_bytes = self.sampling_step()
        out = sample_scales(
            self, vae, label_B, step,
            guided=self.CFG_ONE_RUNS_UNCONDITIONAL or cfg != 1.0,
            cfg=cfg, top_k=top_k, top_p=top_p, g_seed=g_seed, more_smooth=more_smooth,
            decode=decode, record_logits=record_logits,
        )  # fmt: skip
        out.kv_cache_bytes = kv_cache_bytes()
        return out

    # -- initialisation (training from scratch; docs/var.md §2.7) --------------------
    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02
    ) -> None:
        if self.pos_1LC.device.type == "meta":
            return
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        depth = len(self.blocks)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if not block.shared_aln:
                w = block.ada_lin[-1].weight
                w[2 * self.C :].mul_(init_adaln)
                w[: 2 * self.C].mul_(init_adaln_gamma)
            if block.attn.attn_l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
