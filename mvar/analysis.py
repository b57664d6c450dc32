"""Where attention goes: per key scale and per spatial distance (MVAR's premise, tested).

MVAR (arXiv 2505.12742, §1 and its motivation figure) rests on an observation about VAR: a
query's attention mass sits mostly on its own scale (and the one before it) and, within a
scale, on a small spatial neighbourhood. This module measures that on any VAR or MVAR model
during teacher forcing on real tokens:

* :class:`AttentionProbe` hooks the attention cores (``model.dense_attention`` and, for MVAR,
  ``model.neighbourhood_attention``) with forward hooks and a pre-hook per block that says
  which layer runs. For every attention call it recomputes the probabilities
  softmax(scale·q·kᵀ + mask) in float64 from the call's own q and k — one query scale's rows of
  one layer at a time — hands them to an :class:`AttentionAccumulator` and drops them. No
  layer's map outlives its call and the model's outputs are untouched (the hooks return
  nothing). For MVAR the mask is what the model used: block-diagonal scales, and on
  neighbourhood scales the NATTEN window (the probabilities are those of the window). Each
  recomputation is checked against the call's output (P·v must reproduce it within the
  attention tolerance of the input dtype), so the analysed probabilities are the ones that ran.
* :class:`AttentionAccumulator` sums, in float64, per layer and head:

  1. the mass from each query scale onto each key scale (an S×S matrix; rows sum to 1);
  2. for the query's own scale (offset 0) and the previous scale (offset 1): the mass by
     Chebyshev distance and the mass inside a k×k window, k = 1..N. Keys of the previous scale
     (side p') are placed on the query's grid (side p) at their centres,
     c = (i + 0.5)·p/p' − 0.5. A key is at distance bin r when its Chebyshev distance d to the
     query satisfies r − 0.5 < d ≤ r + 0.5 (for keys of the own scale: d = r), and inside a
     window when its centre lies within the window's cells, borders included. Two window
     rules: ``natten`` — NATTEN's window, shifted inwards at the grid border
     (``mvar.attention.window_starts``; what MVAR's neighbourhood attention keeps) — and
     ``centred`` — all keys within Chebyshev radius (k − 1)/2 of the query, cut at the border
     (the cumulative distance mass). The full window is k = p (natten) or k = 2p − 1
     (centred); both then hold every key of the scale;
  3. the share of mass MVAR's pattern keeps: own scale only, inside the k = ``kernel_size``
     NATTEN window on scales ≥ ``refine_step``, the whole own scale below (docs/mvar.md §1–2).

* :func:`analyse` runs teacher forcing on images (tokenised with the VQ-VAE) or tokens and
  returns an :class:`AttentionAnalysis`: the sums, normalised views, CSV rows and an npz.

Fractions averaged over layers and heads pool the sums (the share of all the mass of those
layers and heads), which for the S×S rows equals the mean of the per-layer matrices.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mvar.attention import tolerance, window_starts
from mvar.config import PyramidGeometry

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

KEY_OFFSETS: tuple[int, ...] = (0, 1)  # own scale, previous scale
OFFSET_NAMES: dict[int, str] = {0: "own", 1: "previous"}
WINDOW_RULES: tuple[str, ...] = ("natten", "centred")
TABLE = "attention-analysis"


# ---------------------------------------------------------------------------------------------
# Geometry: where each key lands on a query's grid
# ---------------------------------------------------------------------------------------------


def scale_of_tokens(g: PyramidGeometry) -> Tensor:
    """(L,) int64: the scale of every token."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(g.patch_nums)])


def _axis_twice_centres(p_key: int, p_query: int) -> Tensor:
    """2·p'·c for each key index i of an axis of side p' mapped onto a side-p grid, where
    c = (i + 0.5)·p/p' − 0.5: (2i + 1)·p − p' — integers, so every test below is exact."""
    i = torch.arange(p_key, dtype=torch.int64)
    return (2 * i + 1) * p_query - p_key


def distance_bins(p_query: int, p_key: int) -> Tensor:
    """(p², p'²) int64: the Chebyshev distance bin r of each (query, key) pair, key placed on the
    query's grid at its centre; r is the smallest integer with d <= r + 0.5 (d = r on the own
    scale). Every bin is < p."""
    c2 = _axis_twice_centres(p_key, p_query)  # (p',) = 2p'·c
    q2 = 2 * p_key * torch.arange(p_query, dtype=torch.int64)  # (p,) = 2p'·q
    d2 = (c2.view(1, -1) - q2.view(-1, 1)).abs()  # (p, p') = 2p'·|c − q|
    # d <= r + 0.5  <=>  d2 <= p'(2r + 1)  <=>  r >= (d2 − p') / 2p'
    r_axis = torch.clamp(-((p_key - d2) // (2 * p_key)), min=0)  # ceil((d2 − p') / 2p')
    r = torch.maximum(r_axis.view(p_query, 1, p_key, 1), r_axis.view(1, p_query, 1, p_key))
    return r.reshape(p_query * p_query, p_key * p_key)


def natten_axis_mask(p_query: int, p_key: int, k: int) -> Tensor:
    """(p, p') bool, one axis: whether key index i (at its centre c on the query's axis) lies in
    the cells of query index q's NATTEN window, start = clamp(q − k//2, 0, p − k), borders
    included: start − 0.5 <= c <= start + k − 0.5."""
    st = torch.tensor(window_starts(p_query, k), dtype=torch.int64).view(-1, 1)  # (p, 1)
    c2 = _axis_twice_centres(p_key, p_query).view(1, -1)  # (1, p') = 2p'·c
    # in units of 1/2p':  2p'·st <= c2 + p' <= 2p'(st + k)
    return (c2 + p_key >= 2 * p_key * st) & (c2 + p_key <= 2 * p_key * (st + k))


def natten_window_mask(p_query: int, p_key: int, k: int) -> Tensor:
    """(p², p'²) bool: whether a key (placed at its centre on the query grid) lies inside the
    query's k×k NATTEN window (:func:`natten_axis_mask` on both axes). On the own scale
    (p' = p) this is exactly NATTEN's neighbourhood."""
    inside = natten_axis_mask(p_query, p_key, k)
    m = inside.view(p_query, 1, p_key, 1) & inside.view(1, p_query, 1, p_key)
    return m.reshape(p_query * p_query, p_key * p_key)


def mvar_pattern_windowed(si: int, pn: int, kernel_size: int, refine_step: int) -> bool:
    """Whether MVAR's pattern restricts scale ``si`` to a NATTEN window (docs/mvar.md §2)."""
    return si >= refine_step and kernel_size <= pn


# ---------------------------------------------------------------------------------------------
# The accumulator: float64 sums per layer and head
# ---------------------------------------------------------------------------------------------


class AttentionAccumulator:
    """Float64 sums of attention mass, filled one probability block at a time (:meth:`add`).

    Arrays (D layers, H heads, S scales, O = len(KEY_OFFSETS), N = the largest side):

    * ``scale_sum`` (D, H, S, S): Σ over images and queries of scale q of the mass on scale k;
    * ``distance_sum`` (D, H, S, O, N): mass on scale q − o at distance bin r;
    * ``natten_sum`` (D, H, S, O, N): mass on scale q − o inside the k×k NATTEN window,
      index k − 1 (NaN where k > p or q − o < 0);
    * ``query_count`` (D, S): queries summed (images × p²);
    * ``query_map_sum`` (D, H, Q, L): the full attention rows of the tracked queries.
    """

    def __init__(
        self,
        geometry: PyramidGeometry,
        num_layers: int,
        num_heads: int,
        tracked_queries: Sequence[tuple[int, int, int]] = (),
    ) -> None:
        self.geometry = g = geometry
        self.num_layers, self.num_heads = num_layers, num_heads
        D, H, S, N, O = num_layers, num_heads, g.num_scales, g.side, len(KEY_OFFSETS)
        self.scale_sum = torch.zeros(D, H, S, S, dtype=torch.float64)
        self.distance_sum = torch.zeros(D, H, S, O, N, dtype=torch.float64)
        self.natten_sum = torch.full((D, H, S, O, N), math.nan, dtype=torch.float64)
        for si, pn in enumerate(g.patch_nums):
            for oi, o in enumerate(KEY_OFFSETS):
                if si - o >= 0:
                    self.natten_sum[:, :, si, oi, :pn] = 0.0
        self.query_count = torch.zeros(D, S, dtype=torch.float64)
        # Tracked queries: (scale, row, col) -> token index within the pyramid.
        self.tracked_queries = tuple(tracked_queries)
        for si, r, c in self.tracked_queries:
            pn = g.patch_nums[si]
            if not (0 <= r < pn and 0 <= c < pn):
                raise ValueError(f"tracked query ({r}, {c}) is outside scale {si}'s {pn}x{pn} grid")
        self.query_map_sum = torch.zeros(
            D, H, len(self.tracked_queries), g.seq_len, dtype=torch.float64
        )
        self._scale_of = scale_of_tokens(g)
        self._bins: dict[tuple[int, int], Tensor] = {}
        self._windows: dict[tuple[int, int], Tensor] = {}

    def _bins_for(self, pq: int, pk: int, device: torch.device) -> Tensor:
        if (pq, pk) not in self._bins:
            self._bins[(pq, pk)] = distance_bins(pq, pk)
        return self._bins[(pq, pk)].to(device)

    def _axis_windows(self, pq: int, pk: int, device: torch.device) -> Tensor:
        """(p, p, p') float64: the axis masks of k = 1..p (windows are separable by axis)."""
        if (pq, pk) not in self._windows:
            masks = [natten_axis_mask(pq, pk, k) for k in range(1, pq + 1)]
            self._windows[(pq, pk)] = torch.stack(masks).to(torch.float64)
        return self._windows[(pq, pk)].to(device)

    @torch.no_grad()
    def add(self, layer: int, query_scale: int, probs_BHqK: Tensor, key_tokens: Tensor) -> None:
        """Add one block of probabilities: every query of ``query_scale`` (row-major, all p² of
        them) of ``layer`` against the keys ``key_tokens`` (pyramid token indices, (K,)).

        Keys absent from ``key_tokens`` had probability 0 (masked out by the model)."""
        g = self.geometry
        B, H, lq, K = probs_BHqK.shape
        pq = g.patch_nums[query_scale]
        if lq != pq * pq or H != self.num_heads or key_tokens.shape != (K,):
            raise ValueError(
                f"probability block {tuple(probs_BHqK.shape)} with {tuple(key_tokens.shape)} keys "
                f"does not fit scale {query_scale} ({pq}x{pq} queries, {self.num_heads} heads)"
            )
        dev = probs_BHqK.device
        P_HqK = probs_BHqK.to(torch.float64).sum(0)  # summed over images
        key_tokens = key_tokens.to(dev)
        key_scale = self._scale_of.to(dev)[key_tokens]
        # (1) mass per key scale
        mass_HS = torch.zeros(H, g.num_scales, dtype=torch.float64, device=dev)
        mass_HS.index_add_(1, key_scale, P_HqK.sum(1))
        self.scale_sum[layer, :, query_scale] += mass_HS.cpu()
        self.query_count[layer, query_scale] += B * lq
        # (2) distance and window mass on the own and the previous scale
        for oi, o in enumerate(KEY_OFFSETS):
            ks = query_scale - o
            if ks < 0:
                continue
            pk = g.patch_nums[ks]
            bg, _ = g.begin_ends[ks]
            sel = (key_scale == ks).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue  # the model masked this whole scale out: all sums stay 0
            # Scatter the block's keys of scale ks onto that scale's full p'² grid.
            sub = P_HqK.new_zeros(H, lq, pk * pk)
            sub[:, :, key_tokens[sel] - bg] = P_HqK[:, :, sel]
            bins = self._bins_for(pq, pk, dev)
            dist = torch.zeros(H, g.side, dtype=torch.float64, device=dev)
            dist.index_add_(1, bins.flatten(), sub.reshape(H, -1))
            self.distance_sum[layer, :, query_scale, oi] += dist.cpu()
            # Σ P·[row inside]·[col inside] for every k at once: (h, qr, qc, kr, kc) × (k, qr, kr)
            # × (k, qc, kc); the window of k is the product of its two axis masks.
            A = self._axis_windows(pq, pk, dev)
            win = torch.einsum("hacbd,kab,kcd->hk", sub.view(H, pq, pq, pk, pk), A, A)
            self.natten_sum[layer, :, query_scale, oi, :pq] += win.cpu()
        # Tracked queries' full rows.
        for ti, (si, r, c) in enumerate(self.tracked_queries):
            if si == query_scale:
                row = torch.zeros(H, g.seq_len, dtype=torch.float64, device=dev)
                row[:, key_tokens] = P_HqK[:, r * pq + c]
                self.query_map_sum[layer, :, ti] += row.cpu()


# ---------------------------------------------------------------------------------------------
# The probe: forward hooks on the attention cores
# ---------------------------------------------------------------------------------------------


class AttentionProbe:
    """Forward hooks that feed an :class:`AttentionAccumulator` with each attention call's
    probabilities, one layer (and one query scale) at a time.

    Use as a context manager around a teacher-forcing forward and set ``query_tokens`` (the
    pyramid token indices of the rows the forward runs, in order) before each call. The
    probabilities are recomputed from the call's q and k (float64) with the call's own mask,
    checked against its output (``check_outputs``) and dropped.

    ``live_maps`` / ``peak_live_maps`` count probability blocks alive (weak references), and
    ``live_maps_at_layer_start`` the largest count seen when a block starts: 0 means no map
    survived its layer.
    """

    def __init__(
        self, model: nn.Module, accumulator: AttentionAccumulator, check_outputs: bool = True
    ) -> None:
        self.model = model
        self.acc = accumulator
        self.check_outputs = check_outputs
        self.query_tokens: Tensor | None = None
        self.layer: int | None = None
        self.live_maps = 0
        self.peak_live_maps = 0
        self.live_maps_at_layer_start = 0
        self.peak_map_bytes = 0
        self.calls = 0
        self.max_output_error = 0.0
        self._handles: list[Any] = []

    # -- hooks ------------------------------------------------------------------------------
    def _on_block(self, layer: int) -> Any:
        def pre_hook(module: nn.Module, args: Any) -> None:
            self.layer = layer
            self.live_maps_at_layer_start = max(self.live_maps_at_layer_start, self.live_maps)

        return pre_hook

    def _on_dense(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        q, k, v = args[:3]
        bias = args[3] if len(args) > 3 else kwargs.get("attn_bias")
        self._analyse_call(q, k, v, out, float(module.scale), bias=bias, grid=None)

    def _on_na(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        q, k, v = args[:3]
        grid = args[3] if len(args) > 3 else kwargs["grid_hw"]
        self._analyse_call(
            q,
            k,
            v,
            out,
            float(module.scale),
            bias=None,
            grid=(tuple(grid), int(module.kernel_size)),
        )

    def _release(self) -> None:
        self.live_maps -= 1

    def _analyse_call(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        scale: float,
        bias: Tensor | None,
        grid: tuple[tuple[int, int], int] | None,
    ) -> None:
        if self.layer is None or self.query_tokens is None:
            raise RuntimeError("AttentionProbe: set query_tokens and run the model's blocks")
        tokens = self.query_tokens.to(q.device)
        l = q.shape[2]
        if l != tokens.numel() or k.shape[2] != l:
            raise RuntimeError(
                f"attention call with {l} queries and {k.shape[2]} keys, expected "
                f"{tokens.numel()} of each (teacher forcing: the keys are the queries' tokens)"
            )
        self.calls += 1
        g = self.acc.geometry
        scale_of = self.acc._scale_of.to(q.device)[tokens]
        qd, kd, vd = (t.to(torch.float64) for t in (q, k, v))
        tol = tolerance(
            q.dtype
            if q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            else torch.float32
        )
        for si in torch.unique(scale_of).tolist():
            rows = (scale_of == si).nonzero().squeeze(1)
            logits = torch.matmul(qd[:, :, rows], kd.transpose(-1, -2)).mul_(scale)
            if grid is not None:  # neighbourhood attention: the NATTEN window of this scale
                (h, w), ks = grid
                pn = g.patch_nums[si]
                if (h, w) != (pn, pn) or rows.numel() != l:
                    raise RuntimeError(
                        f"neighbourhood attention on grid {h}x{w} does not match "
                        f"scale {si} ({pn}x{pn}, {rows.numel()} of {l} tokens)"
                    )
                keep = natten_window_mask(pn, pn, ks).to(q.device)
                logits.masked_fill_(~keep, -math.inf)
            elif bias is not None:
                logits.add_(bias[..., rows, :].to(torch.float64))  # broadcast over B, H
            probs = torch.softmax(logits, dim=-1)
            del logits
            self.live_maps += 1
            self.peak_live_maps = max(self.peak_live_maps, self.live_maps)
            self.peak_map_bytes = max(self.peak_map_bytes, probs.numel() * probs.element_size())
            weakref.finalize(probs, self._release)
            if self.check_outputs:
                err = (torch.matmul(probs, vd) - out[:, :, rows].to(torch.float64)).abs()
                bound = tol.atol + tol.rtol * out[:, :, rows].to(torch.float64).abs()
                self.max_output_error = max(self.max_output_error, float(err.max()))
                if bool((err > 4 * bound).any()):
                    raise RuntimeError(
                        f"layer {self.layer}, scale {si}: the recomputed probabilities do not "
                        f"reproduce the attention output (max |P·v − out| = {float(err.max()):.3g}, "
                        f"{q.dtype}); the attention core's semantics differ from what "
                        "mvar.analysis assumes"
                    )
            self.acc.add(self.layer, si, probs, tokens)
            del probs

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> Self:
        m = self.model
        for i, block in enumerate(m.blocks):
            self._handles.append(block.register_forward_pre_hook(self._on_block(i)))
        self._handles.append(
            m.dense_attention.register_forward_hook(self._on_dense, with_kwargs=True)
        )
        na = getattr(m, "neighbourhood_attention", None)
        if na is not None:
            self._handles.append(na.register_forward_hook(self._on_na, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.layer = None


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _pooled(a: np.ndarray, layer: int | None, head: int | None) -> np.ndarray:
    """Sum over layers / heads (axis 0 / 1) unless one is picked."""
    a = a[layer : layer + 1] if layer is not None else a
    a = a[:, head : head + 1] if head is not None else a
    return a.sum((0, 1))


@dataclass
class AttentionAnalysis:
    """The accumulated sums of one model with what produced them; views normalise on demand."""

    model: str
    arch: str
    patch_nums: tuple[int, ...]
    kernel_size: int
    refine_step: int
    num_images: int
    scale_sum: np.ndarray  # (D, H, S, S)
    distance_sum: np.ndarray  # (D, H, S, O, N)
    natten_sum: np.ndarray  # (D, H, S, O, N)
    query_count: np.ndarray  # (D, S)
    query_map_sum: np.ndarray  # (D, H, Q, L)
    tracked_queries: tuple[tuple[int, int, int], ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.scale_sum.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.scale_sum.shape[1])

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def _count(self, layer: int | None, head: int | None) -> np.ndarray:
        c = self.query_count[layer : layer + 1] if layer is not None else self.query_count
        heads = 1 if head is not None else self.num_heads
        return c.sum(0) * heads  # (S,)

    # -- (1) ---------------------------------------------------------------------------------
    def scale_mass(self, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """(S, S): mean mass from a query of scale q (row) onto key scale k; rows sum to 1."""
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN rows: scales not analysed
            return _pooled(self.scale_sum, layer, head) / self._count(layer, head)[:, None]

    # -- (2) ---------------------------------------------------------------------------------
    def key_scale_mass(
        self, offset: int, layer: int | None = None, head: int | None = None
    ) -> np.ndarray:
        """(S,) Σ mass on scale q − offset (the denominators of the distance / window shares);
        NaN for q − offset < 0."""
        s = _pooled(self.scale_sum, layer, head)
        return np.array(
            [s[q, q - offset] if q - offset >= 0 else math.nan for q in range(self.num_scales)]
        )

    def distance_mass(
        self, offset: int, layer: int | None = None, head: int | None = None
    ) -> np.ndarray:
        """(S, N): share of the mass on scale q − offset at Chebyshev distance bin r (sums to
        1 over r; NaN when that scale got no mass or does not exist)."""
        d = _pooled(self.distance_sum[:, :, :, KEY_OFFSETS.index(offset)], layer, head)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = d / self.key_scale_mass(offset, layer, head)[:, None]
        for q, pn in enumerate(self.patch_nums):
            out[q, pn:] = math.nan
        return out

    def window_mass(
        self, offset: int, rule: str = "natten", layer: int | None = None, head: int | None = None
    ) -> np.ndarray:
        """(S, K): share of the mass on scale q − offset inside a k×k window.

        ``natten``: column k − 1 for k = 1..N (NaN beyond k = p; k = p is the full grid).
        ``centred``: column r for k = 2r + 1, r = 0..N − 1 (k = 2p − 1 is the full window)."""
        if rule == "centred":
            return np.nancumsum(self.distance_mass(offset, layer, head), axis=1) + np.where(
                np.isnan(self.distance_mass(offset, layer, head)), math.nan, 0.0
            )
        if rule != "natten":
            raise ValueError(f"window rule must be one of {WINDOW_RULES}, got {rule!r}")
        w = _pooled(self.natten_sum[:, :, :, KEY_OFFSETS.index(offset)], layer, head)
        with np.errstate(invalid="ignore", divide="ignore"):
            return w / self.key_scale_mass(offset, layer, head)[:, None]

    # -- (3) ---------------------------------------------------------------------------------
    def kept_mass_per_scale(self, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """(S,): mean share of a query's mass that MVAR's pattern keeps (own scale; inside the
        ``kernel_size`` NATTEN window on scales >= ``refine_step``)."""
        s = _pooled(self.scale_sum, layer, head)
        w = _pooled(self.natten_sum[:, :, :, KEY_OFFSETS.index(0)], layer, head)
        kept = np.array(
            [
                w[q, self.kernel_size - 1]
                if mvar_pattern_windowed(q, pn, self.kernel_size, self.refine_step)
                else s[q, q]
                for q, pn in enumerate(self.patch_nums)
            ]
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return kept / self._count(layer, head)

    def kept_mass(self, layer: int | None = None, head: int | None = None) -> float:
        """The share over all queries of the pyramid (each query weighs the same)."""
        c = self._count(layer, head)
        return float((self.kept_mass_per_scale(layer, head) * c).sum() / c.sum())

    def query_map(self, index: int, layer: int | None = None) -> np.ndarray:
        """(L,): mean attention row of tracked query ``index`` (over images and heads)."""
        r = _pooled(self.query_map_sum[:, :, index : index + 1], layer, None)[0]
        n = self.num_images * self.num_heads * (1 if layer is not None else self.num_layers)
        return r / n

    # -- persistence -------------------------------------------------------------------------
    _ARRAYS = ("scale_sum", "distance_sum", "natten_sum", "query_count", "query_map_sum")

    def save_npz(self, path: str | Path) -> Path:
        import json

        from mvar.io import atomic_path

        meta = {
            k: getattr(self, k)
            for k in (
                "model",
                "arch",
                "patch_nums",
                "kernel_size",
                "refine_step",
                "num_images",
                "tracked_queries",
                "info",
            )
        }
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(
                f, meta=np.array(json.dumps(meta)), **{k: getattr(self, k) for k in self._ARRAYS}
            )
        return Path(path)

    @classmethod
    def load_npz(cls, path: str | Path) -> AttentionAnalysis:
        import json

        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in cls._ARRAYS}
        meta["patch_nums"] = tuple(meta["patch_nums"])
        meta["tracked_queries"] = tuple(tuple(t) for t in meta["tracked_queries"])
        return cls(**meta, **arrays)


# ---------------------------------------------------------------------------------------------
# CSV rows
# ---------------------------------------------------------------------------------------------

_METRIC_RE = re.compile(r"^(?P<name>[a-z_]+)\[(?P<labels>[^\]]*)\]$")


def metric_name(name: str, **labels: object) -> str:
    """``scale_mass[layer=all,head=all,qs=9,ks=8]``: a metric with its indices in the name (the
    long format has no column for them). ``all`` means pooled over layers / heads."""
    return f"{name}[{','.join(f'{k}={v}' for k, v in labels.items())}]"


def parse_metric(metric: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`metric_name`; a bare name gives no labels."""
    m = _METRIC_RE.match(metric)
    if not m:
        return metric, {}
    labels = dict(kv.split("=", 1) for kv in m.group("labels").split(",") if kv)
    return m.group("name"), labels


def summary_scale_mass(
    a: AttentionAnalysis, layer: int | None = None, head: int | None = None
) -> dict[str, float]:
    """Share of all queries' mass (each query weighs the same) on their ``own`` scale, the
    ``previous`` one and ``earlier`` ones (the first scale has neither of the last two)."""
    s = _pooled(a.scale_sum, layer, head)
    total = float(a._count(layer, head).sum())
    own = sum(s[q, q] for q in range(a.num_scales))
    prev = sum(s[q, q - 1] for q in range(1, a.num_scales))
    earlier = sum(s[q, : q - 1].sum() for q in range(2, a.num_scales))
    return {"own": own / total, "previous": prev / total, "earlier": earlier / total}


def analysis_rows(
    a: AttentionAnalysis,
    env: Any,
    *,
    model: str | None = None,
    per_layer: bool = True,
    per_head: bool = True,
) -> list[Any]:
    """Long-format rows (``repro.report.ResultRow``) of an analysis.

    Metrics (labels in the name, :func:`metric_name`): ``scale_mass[layer,head,qs,ks]`` (and
    ``qs=all`` with ``ks=own|previous|earlier``, :func:`summary_scale_mass`),
    ``distance_mass[layer,head,qs,offset,r]``, ``window_mass[layer,head,qs,offset,rule,k]``
    (k odd up to the full window, and ``k=full``), ``mvar_kept_mass[layer,head,qs]`` (``qs=all``
    over the pyramid). Rows: pooled over everything; per layer (heads pooled); per head (layers
    pooled, scale and kept mass only). Shares whose scale got no mass (e.g. MVAR's previous
    scale) are left out.
    """
    from repro.report import make_row

    name = model or a.model
    views: list[tuple[str, str, int | None, int | None]] = [("all", "all", None, None)]
    if per_layer:
        views += [(str(i), "all", i, None) for i in range(a.num_layers)]
    head_views = [(("all", str(h), None, h)) for h in range(a.num_heads)] if per_head else []

    def row(metric: str, value: float) -> Any:
        return make_row(
            env, TABLE, name, metric, value, method="counted", unit="fraction", batch=a.num_images
        )

    rows = []
    for lab_l, lab_h, layer, head in views:
        for ks, v in summary_scale_mass(a, layer, head).items():
            rows.append(row(metric_name("scale_mass", layer=lab_l, head=lab_h, qs="all", ks=ks), v))
    for lab_l, lab_h, layer, head in views + head_views:
        sm = a.scale_mass(layer, head)
        for q in range(a.num_scales):
            for k in range(a.num_scales):
                rows.append(
                    row(metric_name("scale_mass", layer=lab_l, head=lab_h, qs=q, ks=k), sm[q, k])
                )
        kept = a.kept_mass_per_scale(layer, head)
        for q in range(a.num_scales):
            rows.append(row(metric_name("mvar_kept_mass", layer=lab_l, head=lab_h, qs=q), kept[q]))
        rows.append(
            row(
                metric_name("mvar_kept_mass", layer=lab_l, head=lab_h, qs="all"),
                a.kept_mass(layer, head),
            )
        )
    for lab_l, lab_h, layer, head in views:
        for o in KEY_OFFSETS:
            dm = a.distance_mass(o, layer, head)
            wn = a.window_mass(o, "natten", layer, head)
            wc = a.window_mass(o, "centred", layer, head)
            for q, pn in enumerate(a.patch_nums):
                if not np.isfinite(dm[q, 0]):
                    continue
                lab = {"layer": lab_l, "head": lab_h, "qs": q, "offset": OFFSET_NAMES[o]}
                for r in range(pn):
                    rows.append(row(metric_name("distance_mass", **lab, r=r), dm[q, r]))
                for k in [*range(1, pn, 2), "full"]:
                    kk = pn if k == "full" else k
                    rows.append(
                        row(metric_name("window_mass", **lab, rule="natten", k=k), wn[q, kk - 1])
                    )
                for k in [*range(1, 2 * pn - 1, 2), "full"]:
                    r = pn - 1 if k == "full" else (k - 1) // 2
                    rows.append(
                        row(metric_name("window_mass", **lab, rule="centred", k=k), wc[q, r])
                    )
    return rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def default_tracked_queries(patch_nums: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Centre and corner of the last scale, centre of the one before (figure panels)."""
    S, pn, pm = len(patch_nums), patch_nums[-1], patch_nums[-2]
    return ((S - 1, pn // 2, pn // 2), (S - 1, 0, 0), (S - 2, pm // 2, pm // 2))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()  # no class dropout, no drop path: the forward the model runs at inference
    try:
        yield
    finally:
        model.train(was)


def _as_tokens(
    vae: nn.Module | None,
    images_or_tokens: Tensor | Sequence[Tensor],
    patch_nums: Sequence[int],
    batch_size: int,
    device: torch.device,
) -> list[Tensor]:
    if isinstance(images_or_tokens, Tensor):
        img = images_or_tokens
        if img.dim() != 4 or img.shape[1] != 3 or not img.is_floating_point():
            raise ValueError(
                f"images must be a float (B, 3, H, W) tensor in [-1, 1], got "
                f"{img.dtype} {tuple(img.shape)}"
            )
        if float(img.min()) < -1.0 - 1e-6 or float(img.max()) > 1.0 + 1e-6:
            raise ValueError(
                "images must lie in [-1, 1] (the VQ-VAE's input range); got "
                f"[{float(img.min()):.3g}, {float(img.max()):.3g}]"
            )
        if vae is None:
            raise ValueError("tokenising images needs the VQ-VAE (vae=None given)")
        parts = [
            vae.img_to_idx(img[i : i + batch_size].to(device))
            for i in range(0, img.shape[0], batch_size)
        ]
        return [torch.cat([p[si] for p in parts]) for si in range(len(patch_nums))]
    idx = [t.to(device) for t in images_or_tokens]
    if len(idx) != len(patch_nums) or any(
        t.dim() != 2 or t.shape[1] != pn * pn or t.shape[0] != idx[0].shape[0]
        for t, pn in zip(idx, patch_nums)
    ):
        raise ValueError(
            f"tokens must be one (B, pn²) tensor per scale for patch_nums "
            f"{tuple(patch_nums)}, got {[tuple(t.shape) for t in idx]}"
        )
    return idx


@torch.no_grad()
def analyse(
    model: nn.Module,
    vae: nn.Module | None,
    images_or_tokens: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    batch_size: int = 8,
    tracked_queries: Sequence[tuple[int, int, int]] | None = None,
    kernel_size: int | None = None,
    refine_step: int | None = None,
    check_outputs: bool = True,
    name: str | None = None,
) -> AttentionAnalysis:
    """Teacher-force ``model`` (VAR or MVAR) on real tokens and accumulate where its attention
    goes (module docstring).

    Args:
        model: a ``baselines.var.VAR`` or ``mvar.model.MVAR`` (run in eval mode here).
        vae: the VQ-VAE giving the tokens and the teacher-forcing input.
        images_or_tokens: float images (B, 3, H, W) in [-1, 1], or tokens, one (B, pn²) int64
            tensor per scale (``vae.img_to_idx``).
        labels: (B,) class labels; None conditions every image on the null class (the
            unconditional branch of classifier-free guidance).
        batch_size: images per teacher-forcing forward.
        tracked_queries: (scale, row, col) queries whose full attention rows are kept for the
            per-query maps (default :func:`default_tracked_queries`).
        kernel_size, refine_step: MVAR's pattern for the kept share (default: the config's).
        check_outputs: check each recomputed probability block against the call's output.
        name: the model's name in the results (default the config's).

    Returns:
        an :class:`AttentionAnalysis` (``info`` records the probe's counters and what ran).
    """
    cfg = model.config
    device = next(model.parameters()).device
    geometry = PyramidGeometry(tuple(cfg.patch_nums))
    idx = _as_tokens(vae, images_or_tokens, geometry.patch_nums, batch_size, device)
    if vae is None:
        raise ValueError("the teacher-forcing input needs the VQ-VAE (vae=None given)")
    n = int(idx[0].shape[0])
    if n == 0:
        raise ValueError("no images or tokens to analyse")
    if labels is None:
        labels = torch.full((n,), cfg.num_classes, dtype=torch.long)
    labels = labels.to(device=device, dtype=torch.long)
    if labels.shape != (n,) or int(labels.min()) < 0 or int(labels.max()) > cfg.num_classes:
        raise ValueError(
            f"labels must be ({n},) in [0, {cfg.num_classes}] "
            f"({cfg.num_classes} = null class), got {tuple(labels.shape)}"
        )
    tracked = (
        tuple(tracked_queries)
        if tracked_queries is not None
        else default_tracked_queries(geometry.patch_nums)
    )
    acc = AttentionAccumulator(geometry, len(model.blocks), cfg.num_heads, tracked)
    probe = AttentionProbe(model, acc, check_outputs=check_outputs)
    L = geometry.seq_len
    if cfg.arch == "var":
        runs: list[list[int]] = [list(range(geometry.num_scales))]
    else:
        runs = model.forward_groups(range(geometry.num_scales))  # the forwards MVAR's own forward runs
    with _eval_mode(model), probe:
        for b0 in range(0, n, batch_size):
            idx_b = [t[b0 : b0 + batch_size] for t in idx]
            x_BLCv = vae.idx_to_teacher_input(idx_b)
            lab = labels[b0 : b0 + batch_size]
            for chunk in runs:
                probe.query_tokens = torch.cat(
                    [torch.arange(*geometry.begin_ends[si]) for si in chunk]
                )
                if cfg.arch == "var":
                    model(lab, x_BLCv)
                else:
                    model(lab, x_BLCv, scales=chunk)
            logger.info("attention analysis: %d / %d images", min(b0 + batch_size, n), n)
    if not bool((acc.query_count == acc.query_count[0]).all()):
        raise RuntimeError("layers saw different numbers of queries; a forward was incomplete")
    if int(acc.query_count[0].sum()) != n * L:
        raise RuntimeError(f"analysed {int(acc.query_count[0].sum())} queries, expected {n * L}")
    from mvar.attention import default_backend

    na = getattr(model, "neighbourhood_attention", None)
    info = {
        "probabilities": "recomputed in float64 from each call's q, k and mask",
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "na_backend": (na.backend or default_backend(device)) if na is not None else None,
        "labels": "null class" if bool((labels == cfg.num_classes).all()) else "given",
        "attention_calls": probe.calls,
        "peak_live_maps": probe.peak_live_maps,
        "live_maps_at_layer_start": probe.live_maps_at_layer_start,
        "peak_map_bytes": probe.peak_map_bytes,
        "max_output_error": probe.max_output_error if check_outputs else None,
    }
    return AttentionAnalysis(
        model=name or cfg.name,
        arch=cfg.arch,
        patch_nums=geometry.patch_nums,
        kernel_size=kernel_size or cfg.kernel_size,
        refine_step=refine_step or cfg.refine_step,
        num_images=n,
        scale_sum=acc.scale_sum.numpy(),
        distance_sum=acc.distance_sum.numpy(),
        natten_sum=acc.natten_sum.numpy(),
        query_count=acc.query_count.numpy(),
        query_map_sum=acc.query_map_sum.numpy(),
        tracked_queries=tracked,
        info=info,
    )


def from_accumulator(
    acc: AttentionAccumulator,
    *,
    model: str = "synthetic",
    arch: str = "var",
    kernel_size: int = 7,
    refine_step: int = 8,
    num_images: int = 1,
) -> AttentionAnalysis:
    """An :class:`AttentionAnalysis` of an accumulator filled by hand (tests, other probes)."""
    return AttentionAnalysis(
        model=model,
        arch=arch,
        patch_nums=acc.geometry.patch_nums,
        kernel_size=kernel_size,
        refine_step=refine_step,
        num_images=num_images,
        scale_sum=acc.scale_sum.numpy(),
        distance_sum=acc.distance_sum.numpy(),
        natten_sum=acc.natten_sum.numpy(),
        query_count=acc.query_count.numpy(),
        query_map_sum=acc.query_map_sum.numpy(),
        tracked_queries=acc.tracked_queries,
    )
