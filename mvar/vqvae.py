"""VAR's tokenizer: a multi-scale residual VQ-VAE (``docs/var.md`` §1).

Reads top to bottom: the convolutional building blocks, the encoder and decoder, the φ
table and the multi-scale residual quantizer, then :class:`VQVAE`, the one object the
transformers talk to. Module and parameter names are the official ones, so
``vae_ch160v4096z32.pth`` and the parity fixture's ``vae_state_dict`` load with
``strict=True`` (use :func:`load_vqvae_state_dict`, which also tolerates the official files'
differently sized ``ema_vocab_hit_SV`` statistics buffer).

All geometry (latent grid, number of scales, image size) comes from :class:`VQVAEConfig`;
nothing here assumes 256 px, a 16×16 latent or 10 scales.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvar.config import VQVAEConfig
from mvar.statedict import state_dict_mismatch

logger = logging.getLogger(__name__)

__all__ = [
    "VQVAE",
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "MultiScaleQuantizer",
    "Phi",
    "QuantizerOutput",
    "ResnetBlock",
    "Upsample",
    "VQVAEOutput",
    "load_vqvae_state_dict",
    "phi_indices",
]


# --------------------------------------------------------------------------------------
# Building blocks (docs/var.md §1)
# --------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    # docs/var.md §1: GroupNorm with 32 groups, eps 1e-6, affine, everywhere.
    if channels % 32:
        raise ValueError(
            f"GroupNorm(32) needs a channel count divisible by 32, got {channels}; "
            "choose ch so that every ch * ch_mult[i] is a multiple of 32"
        )
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; dropout is 0 in VAR."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1)
        # The 1x1 shortcut exists only when the width changes (official key ``nin_shortcut``).
        self.nin_shortcut = (
            nn.Conv2d(cin, cout, kernel_size=1, stride=1, padding=0) if cin != cout else None
        )

    def forward(self, x_BChw: Tensor) -> Tensor:
        # In place where the input is a fresh temporary (the official block does the same):
        # the same bits, fewer fresh allocations (at 256 px each is tens of MB, new pages to
        # fault in on the CPU; a few per cent of decode time there, issue 13). Autograd
        # accepts both (silu_ saves what its backward needs; add_ needs nothing).
        h = self.conv1(F.silu(self.norm1(x_BChw), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        shortcut = x_BChw if self.nin_shortcut is None else self.nin_shortcut(x_BChw)
        return h.add_(shortcut)  # = shortcut + h bit for bit (IEEE addition commutes)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions, with one fused 1×1 ``qkv`` conv.

    The products are written as the official ``bmm`` calls in the same order: token
    parity with the fixture needs the encoder to match to the last bits, because a flipped
    near-tie in the nearest-code search changes every later scale.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.w_ratio = channels**-0.5

    def forward(self, x_BChw: Tensor) -> Tensor:
        qkv = self.qkv(self.norm(x_BChw))
        B, _, H, W = qkv.shape
        C = self.channels
        # Channels are ordered [q | k | v] (docs/var.md §1).
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        q_BnC = q.reshape(B, C, H * W).permute(0, 2, 1).contiguous()
        k_BCn = k.reshape(B, C, H * W).contiguous()
        w_Bnn = torch.bmm(q_BnC, k_BCn).mul_(self.w_ratio)  # [query, key]
        w_Bnn = F.softmax(w_Bnn, dim=2)
        v_BCn = v.reshape(B, C, H * W).contiguous()
        h_BCn = torch.bmm(v_BCn, w_Bnn.permute(0, 2, 1).contiguous())
        return self.proj_out(h_BCn.view(B, C, H, W)).add_(x_BChw)  # = x + proj_out(h), in place


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3×3 stride-2 conv without padding (docs/var.md §1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.pad(x_BChw, pad=(0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (docs/var.md §1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; a container so the keys read ``down.{i}.block.{j}`` etc."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BChw)))


# --------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B,3,H,W) -> latent (B,Cvae,H/d,W/d), d = 2**(len(ch_mult)-1).

    Levels ``down.{i}`` hold ``num_res_blocks`` blocks of width ``ch*ch_mult[i]``; the
    lowest-resolution level adds one attention block after each res block; every level but
    the last ends with a :class:`Downsample`.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        last = len(mult) - 1
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = _Level()
            block_out = ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == last:
                    level.attn.append(AttnBlock(block_in))
            if i != last:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.Cvae, kernel_size=3, stride=1, padding=1)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        h = self.conv_in(img_B3HW)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B,Cvae,n,n) -> image (B,3,n·d,n·d), unclamped.

    Levels run from the lowest resolution (i = len(ch_mult)-1) up to i = 0 but are stored
    as ``up.{i}`` (official layout), each with ``num_res_blocks + 1`` blocks; the
    lowest-resolution level adds attention after each block; levels i != 0 end with an
    :class:`Upsample`.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        last = len(mult) - 1
        block_in = ch * mult[last]
        self.conv_in = nn.Conv2d(cfg.Cvae, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            level = _Level()
            block_out = ch * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == last:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # so that self.up[i] is level i
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BCvhw: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BCvhw))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


# --------------------------------------------------------------------------------------
# The quantizer: φ and multi-scale residual quantization
# --------------------------------------------------------------------------------------


def phi_indices(num_scales: int, num_convs: int, dtype: type = np.float64) -> tuple[int, ...]:
    """Which of the ``num_convs`` shared φ convs each scale uses (docs/var.md §1).

    Scale si uses argmin_k |ticks_k - si/(S-1)|, first index on ties. The ticks are
    linspace(1/(2K), 1-1/(2K), K) except for K = 4, where the official code uses
    linspace(1/(3K), 1-1/(3K), K) = linspace(1/12, 11/12, 4) (the worked table of docs/var.md §1.2,
    [0,0,1,1,1,2,2,3,3,3] for S = 10 needs exactly that). For S = 10, K = 4 the distances
    tie exactly at si = 2 and si = 7, so the table is decided by the last bit of float64
    arithmetic; ``dtype`` exists only to show that float32 gives another table.
    """
    if num_scales < 2:
        raise ValueError(f"the multi-scale quantizer needs at least 2 scales, got {num_scales}")
    if num_convs < 1:
        raise ValueError(f"need at least one φ conv, got {num_convs}")
    K = num_convs
    # Same float operations as the official numpy code (1/3/K, not 1/(3*K)), same rounding.
    lo = 1 / 3 / K if K == 4 else 1 / 2 / K
    ticks = np.linspace(dtype(lo), dtype(1 - lo), K, dtype=dtype)
    return tuple(
        int(np.argmin(np.abs(ticks - dtype(si / (num_scales - 1))))) for si in range(num_scales)
    )


class Phi(nn.Conv2d):
    """φ(h) = (1 - q)·h + q·conv3x3(h), q = |quant_resi| (docs/var.md §1). Subclasses Conv2d so its
    parameters are ``qresi_ls.{k}.weight`` / ``.bias`` as in the official files."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BCvhw: Tensor) -> Tensor:
        return h_BCvhw.mul(1 - self.resi_ratio) + super().forward(h_BCvhw).mul_(self.resi_ratio)


class _PhiPartiallyShared(nn.Module):
    """Holds the K shared φ convs under ``qresi_ls`` (official ``PhiPartiallyShared``)."""

    def __init__(self, channels: int, quant_resi: float, num_convs: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, quant_resi) for _ in range(num_convs))


class _ScaleStep(NamedTuple):
    si: int
    z_nCv: Tensor  # the residual this scale quantizes, one row per token (detached)
    idx_Bl: Tensor  # its nearest codes, (B, pn*pn)
    fhat_BCvNN: Tensor  # cumulative f̂ after scales 0..si (on the graph of codebook and φ)


class QuantizerOutput(NamedTuple):
    """What the training forward returns (a tuple, so DDP finds the tensors in it)."""

    fhat_BCvNN: Tensor  # straight-through f̂: value f̂, gradient into f
    vq_loss: Tensor  # scalar, averaged over scales
    hit_SV: Tensor  # this process's code hit counts per scale, float
    rest_nCv: list[Tensor]  # per scale, the residual rows that were quantized (detached)


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over the scales ``patch_nums`` with a codebook ``embedding``.

    Official parameter names (``quantize.*``): ``embedding.weight`` [V, Cvae],
    ``quant_resi.qresi_ls.{k}.{weight,bias}``, and the statistics buffer
    ``ema_vocab_hit_SV`` [S, V] (EMA of code hits per scale: written and read only in
    training, by :meth:`record_usage` and :meth:`dead_codes`).
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        if cfg.share_quant_resi < 2:
            # The official non-shared (0) and fully shared (1) variants store φ under other
            # key names; no released VAR/MVAR file uses them.
            raise ValueError(
                f"share_quant_resi must be >= 2 (partially shared φ convs, the released "
                f"layout), got {cfg.share_quant_resi}"
            )
        if abs(cfg.quant_resi) <= 1e-6:
            # The official code replaces φ by an identity without parameters in this case.
            raise ValueError(f"quant_resi must be non-zero, got {cfg.quant_resi}")
        self.patch_nums = tuple(cfg.patch_nums)
        self.Cvae = cfg.Cvae
        self.vocab_size = cfg.vocab_size
        self.phi_index = phi_indices(len(self.patch_nums), cfg.share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.quant_resi = _PhiPartiallyShared(cfg.Cvae, cfg.quant_resi, cfg.share_quant_resi)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.Cvae)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[self.phi_index[si]]

    def _up(self, h_BCvpp: Tensor) -> Tensor:
        # Bicubic, align_corners False, no antialias (docs/var.md §1).
        N = self.patch_nums[-1]
        return F.interpolate(h_BCvpp, size=(N, N), mode="bicubic", align_corners=False)

    @staticmethod
    def _down(f_BCvNN: Tensor, pn: int) -> Tensor:
        return F.interpolate(f_BCvNN, size=(pn, pn), mode="area")

    def nearest(self, z_nCv: Tensor) -> Tensor:
        """Index of the nearest code for each row, squared L2 written as |z|² + |e|² - 2 z·e
        in fp32 (docs/var.md §1), argmin with the first index on ties. The sum is formed in the
        official order (an addmm onto |z|²+|e|²) so near-ties break the same way."""
        z = z_nCv.float()
        E_VCv = self.embedding.weight.detach().float()
        d_nV = z.square().sum(dim=1, keepdim=True) + E_VCv.square().sum(dim=1)
        d_nV = torch.addmm(d_nV, z, E_VCv.T, beta=1, alpha=-2)
        return torch.argmin(d_nV, dim=1)

    def embed(self, idx_Bl: Tensor, pn: int) -> Tensor:
        if idx_Bl.dim() != 2 or idx_Bl.shape[1] != pn * pn:
            raise ValueError(
                f"expected token indices of shape (B, {pn * pn}) for a {pn}x{pn} scale, "
                f"got {tuple(idx_Bl.shape)}"
            )
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def _check_latent(self, f_BCvNN: Tensor) -> None:
        N = self.patch_nums[-1]
        if f_BCvNN.dim() != 4 or f_BCvNN.shape[1:] != (self.Cvae, N, N):
            raise ValueError(
                f"expected a latent of shape (B, {self.Cvae}, {N}, {N}), got {tuple(f_BCvNN.shape)}"
            )

    def _residual_scales(self, f_BCvNN: Tensor) -> Iterator[_ScaleStep]:
        """The multi-scale residual quantization (docs/var.md §1.3), one scale at a
        time: the one definition behind both :meth:`f_to_idx` and the training :meth:`forward`.

        For each scale: z = area-down(rest, pn) (the rest itself at the last scale), the
        nearest codes of z, h = φ(bicubic-up(E[idx])) (no up at the last scale), f̂ += h,
        rest -= h. The rest is detached (it only selects codes); f̂ keeps the graph through
        the codebook and φ, so the training loss reaches both.
        """
        self._check_latent(f_BCvNN)
        B, C = f_BCvNN.shape[:2]
        S = len(self.patch_nums)
        f_rest = f_BCvNN.detach().float().clone()
        fhat_BCvNN = torch.zeros_like(f_rest)
        for si, pn in enumerate(self.patch_nums):
            last = si == S - 1
            z_BCvpp = f_rest if last else self._down(f_rest, pn)
            z_nCv = z_BCvpp.permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bl = self.nearest(z_nCv).reshape(B, pn * pn)
            h_BCvpp = self.embed(idx_Bl, pn)
            h_BCvNN = self.phi(si)(h_BCvpp if last else self._up(h_BCvpp))
            fhat_BCvNN = fhat_BCvNN + h_BCvNN
            # Same arithmetic as the official in-place ``f_rest -= h`` (bitwise), off the graph.
            f_rest = f_rest - h_BCvNN.detach()
            yield _ScaleStep(si, z_nCv, idx_Bl, fhat_BCvNN)

    @torch.no_grad()
    def f_to_idx(self, f_BCvNN: Tensor) -> list[Tensor]:
        """Tokens of each scale for the latent f (docs/var.md §1.3)."""
        return [step.idx_Bl for step in self._residual_scales(f_BCvNN)]

    def forward(self, f_BCvNN: Tensor, beta: float = 0.25) -> QuantizerOutput:
        """Training forward (the semantics of VAR's ``VectorQuantizer2``).

        Per scale s, with f̂_s the cumulative f̂ after scales 0..s:
        ``β·mse(sg[f̂_s], f)`` (commitment: pulls the encoder towards its quantization) +
        ``mse(f̂_s, sg[f])`` (moves the codebook and φ towards the encoder), averaged over the
        scales (β = 0.25 is ``VectorQuantizer2``'s default). The returned f̂ is
        straight-through: its value is f̂, its gradient goes to f unchanged, so the
        reconstruction loss trains the encoder through the non-differentiable code choice.
        """
        f_no_grad = f_BCvNN.detach()
        vq_loss = f_BCvNN.new_zeros(())
        hits: list[Tensor] = []
        rests: list[Tensor] = []
        fhat_BCvNN = f_no_grad
        for step in self._residual_scales(f_BCvNN):
            fhat_BCvNN = step.fhat_BCvNN
            vq_loss = vq_loss + beta * F.mse_loss(fhat_BCvNN.detach(), f_BCvNN)
            vq_loss = vq_loss + F.mse_loss(fhat_BCvNN, f_no_grad)
            hits.append(torch.bincount(step.idx_Bl.flatten(), minlength=self.vocab_size))
            rests.append(step.z_nCv)
        fhat_ste = (fhat_BCvNN.detach() - f_no_grad) + f_BCvNN
        return QuantizerOutput(
            fhat_ste, vq_loss / len(self.patch_nums), torch.stack(hits).float(), rests
        )

    # --- codebook usage and dead codes (training only) ---------------------------------

    @torch.no_grad()
    def record_usage(self, hit_SV: Tensor, step: int) -> None:
        """Fold one step's hit counts [S, V] (summed over every rank) into the EMA buffer
        ``ema_vocab_hit_SV``: the first step copies, then decay 0.9 for the first 100 steps and
        0.99 afterwards (``VectorQuantizer2``'s schedule). The decay is a function of ``step``,
        not of a call counter, so a resumed run updates exactly as an uninterrupted one."""
        ema = self.ema_vocab_hit_SV
        if hit_SV.shape != ema.shape:
            raise ValueError(f"hit counts must be {tuple(ema.shape)}, got {tuple(hit_SV.shape)}")
        if step == 0:
            ema.copy_(hit_SV)
        else:
            keep = 0.9 if step < 100 else 0.99
            ema.mul_(keep).add_(hit_SV.to(ema.dtype), alpha=1 - keep)

    def relative_usage(self) -> Tensor:
        """[S, V]: each code's EMA hit rate at each scale relative to the uniform rate
        (1/V of that scale's tokens), so scales with 1 and 256 tokens per image compare."""
        ema = self.ema_vocab_hit_SV
        return ema * self.vocab_size / ema.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def dead_codes(self, threshold: float) -> Tensor:
        """Indices of the codes whose relative usage is below ``threshold`` at every scale."""
        return torch.nonzero(self.relative_usage().amax(dim=0) < threshold).flatten()

    @torch.no_grad()
    def sample_residuals(self, rests: Sequence[Tensor], n: int, generator: torch.Generator) -> Tensor:
        """n vectors drawn from the residual rows ``rests`` (one [rows, Cvae] tensor per scale).

        Each draw first picks a scale with EQUAL probability, so the small scales (1..16
        tokens per image, the ones known to collapse: FoundationVision/VAR issues 22, 123,
        170, 175) get codes near their own residuals; within the scale a row is picked with
        probability proportional to its squared distance to its nearest code (k-means++
        seeding), so new codes go where the codebook serves the residuals worst. A little
        noise keeps two draws of one row apart.
        """
        if n == 0:
            return torch.zeros(0, self.Cvae)
        S = len(rests)
        scale_n = torch.randint(S, (n,), generator=generator)
        E_VCv = self.embedding.weight.detach().float().cpu()
        out_nCv = torch.zeros(n, self.Cvae)
        for si in range(S):
            where = torch.nonzero(scale_n == si).flatten()
            if where.numel() == 0:
                continue
            z_rCv = rests[si].detach().float().cpu()
            err_r = (z_rCv - E_VCv[self.nearest(z_rCv)]).square().sum(1)
            weight_r = err_r if float(err_r.sum()) > 0 else torch.ones_like(err_r)
            pick = torch.multinomial(weight_r, where.numel(), replacement=True, generator=generator)
            out_nCv[where] = z_rCv[pick]
        noise = torch.randn(out_nCv.shape, generator=generator)
        return out_nCv + noise * 1e-2 * out_nCv.std().nan_to_num(1.0).clamp_min(1e-6)

    @torch.no_grad()
    def replace_codes(self, idx: Tensor, vectors_nCv: Tensor) -> None:
        """Overwrite the codes ``idx`` and zero their usage statistics (a revived code must
        earn its place again before the next check)."""
        w = self.embedding.weight
        w[idx] = vectors_nCv.to(device=w.device, dtype=w.dtype)
        self.ema_vocab_hit_SV[:, idx] = 0

    def _check_idx(self, idx_Bl: Sequence[Tensor], need: int) -> None:
        if len(idx_Bl) < need:
            raise ValueError(f"expected token lists for {need} scales, got {len(idx_Bl)}")
        for si in range(need):
            pn = self.patch_nums[si]
            if idx_Bl[si].dim() != 2 or idx_Bl[si].shape[1] != pn * pn:
                raise ValueError(
                    f"scale {si} ({pn}x{pn}) needs tokens of shape (B, {pn * pn}), "
                    f"got {tuple(idx_Bl[si].shape)}"
                )

    def idx_to_teacher_input(self, idx_Bl: Sequence[Tensor]) -> Tensor:
        """(B, L-1, Cvae): for s = 1..S-1, area-down(f̂ after scales < s, PN[s]) row-major."""
        S = len(self.patch_nums)
        self._check_idx(idx_Bl, S - 1)
        B, N = idx_Bl[0].shape[0], self.patch_nums[-1]
        fhat = torch.zeros(B, self.Cvae, N, N, dtype=torch.float32, device=idx_Bl[0].device)
        rows: list[Tensor] = []
        for si in range(S - 1):
            fhat, nxt = self.next_ar_input(si, fhat, self.embed(idx_Bl[si], self.patch_nums[si]))
            rows.append(nxt.reshape(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(rows, dim=1)

    def idx_to_fhat(self, idx_Bl: Sequence[Tensor]) -> Tensor:
        self._check_idx(idx_Bl, len(self.patch_nums))
        B, N = idx_Bl[0].shape[0], self.patch_nums[-1]
        fhat = torch.zeros(B, self.Cvae, N, N, dtype=torch.float32, device=idx_Bl[0].device)
        for si, pn in enumerate(self.patch_nums):
            fhat, _ = self.next_ar_input(si, fhat, self.embed(idx_Bl[si], pn))
        return fhat

    def next_ar_input(self, si: int, fhat_BCvNN: Tensor, h_BCvpp: Tensor) -> tuple[Tensor, Tensor]:
        S = len(self.patch_nums)
        if not 0 <= si < S:
            raise ValueError(f"scale index {si} is outside 0..{S - 1}")
        pn = self.patch_nums[si]
        if h_BCvpp.shape[1:] != (self.Cvae, pn, pn):
            raise ValueError(
                f"scale {si} needs h of shape (B, {self.Cvae}, {pn}, {pn}), "
                f"got {tuple(h_BCvpp.shape)}"
            )
        if si == S - 1:
            fhat_BCvNN = fhat_BCvNN + self.phi(si)(h_BCvpp)
            return fhat_BCvNN, fhat_BCvNN
        fhat_BCvNN = fhat_BCvNN + self.phi(si)(self._up(h_BCvpp))
        return fhat_BCvNN, self._down(fhat_BCvNN, self.patch_nums[si + 1])


# --------------------------------------------------------------------------------------
# The VQ-VAE
# --------------------------------------------------------------------------------------


class VQVAEOutput(NamedTuple):
    rec_B3HW: Tensor  # decoder output, unclamped
    vq_loss: Tensor
    hit_SV: Tensor
    rest_nCv: list[Tensor]


class VQVAE(nn.Module):
    """VAR's multi-scale residual VQ-VAE; images in [-1, 1] (docs/var.md §1).

    Submodules (official names): ``encoder``, ``decoder``, ``quantize``, ``quant_conv``,
    ``post_quant_conv``. The transformers use it frozen (``img_to_idx`` ... ``fhat_to_img``);
    :meth:`forward` is the training pass (``mvar.train_vae``).
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        if len(cfg.patch_nums) < 2 or list(cfg.patch_nums) != sorted(set(cfg.patch_nums)):
            raise ValueError(
                f"patch_nums must be at least two strictly increasing sides, got {cfg.patch_nums}"
            )
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, kernel_size=3, stride=1, padding=1)

    @property
    def phi_index(self) -> tuple[int, ...]:
        """The φ conv used by each scale, e.g. (0,0,1,1,1,2,2,3,3,3) for 10 scales, K = 4."""
        return self.quantize.phi_index

    def forward(self, img_B3HW: Tensor, beta: float = 0.25) -> VQVAEOutput:
        """Training pass: reconstruction (unclamped) from the straight-through f̂, the vq loss
        and the quantizer's statistics (:meth:`MultiScaleQuantizer.forward`)."""
        self._check_images(img_B3HW)
        q = self.quantize(self.quant_conv(self.encoder(img_B3HW)), beta)
        rec_B3HW = self.decoder(self.post_quant_conv(q.fhat_BCvNN))
        return VQVAEOutput(rec_B3HW, q.vq_loss, q.hit_SV, q.rest_nCv)

    def _check_images(self, img_B3HW: Tensor) -> None:
        size = self.cfg.image_size
        if img_B3HW.dim() != 4 or img_B3HW.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected images of shape (B, 3, {size}, {size}) for patch_nums "
                f"{self.cfg.patch_nums}, got {tuple(img_B3HW.shape)}"
            )

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: Tensor) -> list[Tensor]:
        """Tokens per scale, each (B, pn*pn) int64, of images in [-1, 1]."""
        self._check_images(img_B3HW)
        return self.quantize.f_to_idx(self.quant_conv(self.encoder(img_B3HW)))

    def idx_to_teacher_input(self, idx_Bl: list[Tensor]) -> Tensor:
        """Teacher-forcing input (B, L-1, Cvae): the transformer's input for scales 1..S-1."""
        return self.quantize.idx_to_teacher_input(idx_Bl)

    def idx_to_fhat(self, idx_Bl: list[Tensor]) -> Tensor:
        """Cumulative f̂ (B, Cvae, N, N) after all scales."""
        return self.quantize.idx_to_fhat(idx_Bl)

    def fhat_to_img(self, fhat_BCvNN: Tensor) -> Tensor:
        """Image in [-1, 1]: clamp(decoder(post_quant_conv(f̂)), -1, 1), the same bits as the
        plain out-of-place formula (``tests/test_decode.py``) and the official decoder.

        The whole batch goes through at once, in the default memory layout. Decoding image by
        image would lower the peak (about 1.06 → 0.58 GiB with the weights at 256 px, B = 4)
        but was no faster on the 2-core CPU (a loaded-machine measurement) and changes the
        last bits (oneDNN picks its conv algorithm by batch size). A ``torch.channels_last``
        decoder (``vae.to(memory_format=torch.channels_last)``, the caller's choice) was ~1.1x
        faster in fp32 and ~1.2x under bf16 autocast but is not bitwise either (max |diff| ~3e-5
        in [-1, 1], inside the 1e-3 parity tolerance). Converting the module is all a caller
        does: torch's convolutions follow the weights' layout (a channels-last input alone
        gains nothing). ``bench/bench_sampling.py`` times both layouts (issue 13)."""
        return self.decoder(self.post_quant_conv(fhat_BCvNN)).clamp_(-1, 1)

    @property
    def codebook(self) -> Tensor:
        """The (V, Cvae) codebook (``quantize.embedding.weight``)."""
        return self.quantize.embedding.weight

    def embed(self, idx_Bl_one_scale: Tensor, pn: int) -> Tensor:
        """Codebook vectors of one scale's tokens, (B, pn*pn) -> (B, Cvae, pn, pn)."""
        return self.quantize.embed(idx_Bl_one_scale, pn)

    def next_ar_input(self, si: int, fhat: Tensor, h_BCvpp: Tensor) -> tuple[Tensor, Tensor]:
        """One sampling step (docs/var.md §1.3): returns (new f̂, next input).

        ``h_BCvpp`` is scale si's (B, Cvae, pn, pn) map: the embedding of sampled tokens, or
        a soft mixture of codes. For si < S-1, f̂ += φ(up(h)) and the next input is
        area-down(f̂, PN[si+1]); at the last scale f̂ += φ(h) and the next input is f̂.
        ``fhat`` is not modified in place.
        """
        return self.quantize.next_ar_input(si, fhat, h_BCvpp)


def load_vqvae_state_dict(
    vae: VQVAE, sd: Mapping[str, Tensor], source: str = "<state dict>"
) -> None:
    """Load an official-layout VQ-VAE state dict strictly.

    ``quantize.ema_vocab_hit_SV`` is first resized to the loaded first dimension: it holds
    VAE training statistics only, and official files store it for another number of scales.
    Any other disagreement raises a ``ValueError`` naming ``source``, every missing and
    unexpected key and every shape mismatch (expected vs found).
    """
    ema_key = "quantize.ema_vocab_hit_SV"

    def shape_ok(key: str, want: tuple[int, ...], got: tuple[int, ...]) -> bool:
        if key == ema_key:  # any number of rows, but one column per code
            return len(got) == 2 and got[1] == want[1]
        return got == want

    problems = state_dict_mismatch(vae, sd, shape_ok)
    if problems:
        raise ValueError(
            "\n  ".join([f"VQ-VAE state dict from {source} does not fit {vae.cfg}:", *problems])
        )

    loaded_ema = sd[ema_key]
    cur = vae.quantize.ema_vocab_hit_SV
    if loaded_ema.shape != cur.shape:
        logger.debug(
            "%s: resizing %s from %s to %s",
            source,
            ema_key,
            tuple(cur.shape),
            tuple(loaded_ema.shape),
        )
        vae.quantize.ema_vocab_hit_SV = torch.zeros(
            loaded_ema.shape, dtype=cur.dtype, device=cur.device
        )
    vae.load_state_dict(sd, strict=True)
    logger.info("loaded VQ-VAE weights from %s", source)
