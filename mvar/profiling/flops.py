"""Attention FLOPs: the closed form of the paper's attention-GFLOPs convention and a counter
that hooks the attention cores of a real model (``mvar.blocks.DenseAttention`` /
``NeighbourhoodAttention``).

Convention (docs/counting.md §1): multiply-accumulates of the qkv
projection (3·C² per query token), q·kᵀ and attention·v (C per query-key pair each), per image,
conditional branch only; output projection and MLP excluded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mvar.blocks import DenseAttention, NeighbourhoodAttention
from mvar.config import ModelConfig, get_preset

if TYPE_CHECKING:
    from typing_extensions import Self


def _config(cfg: ModelConfig | str) -> ModelConfig:
    return get_preset(cfg) if isinstance(cfg, str) else cfg


@dataclass(frozen=True)
class AttentionMacs:
    """Multiply-accumulates of the attention blocks per image, summed over layers.

    ``pairs`` is the number of query-key pairs summed over layers (divide by depth for one
    layer); ``qk == av == C * pairs``.
    """

    qkv: int
    qk: int
    av: int
    pairs: int

    @property
    def total(self) -> int:
        return self.qkv + self.qk + self.av

    @property
    def gflops(self) -> float:
        """The paper's "GFLOPs" column: MACs / 1e9 (docs/counting.md §1)."""
        return self.total / 1e9


def attention_pairs_per_scale(cfg: ModelConfig | str) -> list[int]:
    """Query-key pairs of one layer, per image, for each scale's queries.

    VAR: a query of scale s sees every key of scales <= s (block-causal, docs/var.md §2.4).
    MVAR: only its own scale (block-diagonal, docs/mvar.md §1), and on neighbourhood scales exactly
    k×k keys (NATTEN's shifted window never truncates, docs/mvar.md §2).
    """
    cfg = _config(cfg)
    out, seen = [], 0
    for si, pn in enumerate(cfg.patch_nums):
        n = pn * pn
        seen += n
        if cfg.arch == "var":
            out.append(n * seen)
        elif cfg.uses_neighbourhood(si):
            k = cfg.kernel_size
            out.append(n * min(k, pn) * min(k, pn))
        else:
            out.append(n * n)
    return out


def analytic_attention_macs(cfg: ModelConfig | str) -> AttentionMacs:
    """Closed form of the paper's attention GFLOPs (docs/counting.md §1): per layer 3·C²·L for the qkv
    projection plus C per pair for q·kᵀ and again for attention·v; times depth."""
    cfg = _config(cfg)
    C, L, d = cfg.embed_dim, cfg.seq_len, cfg.depth
    pairs = sum(attention_pairs_per_scale(cfg)) * d
    return AttentionMacs(qkv=3 * C * C * L * d, qk=C * pairs, av=C * pairs, pairs=pairs)


def analytic_kv_cache_bytes(
    cfg: ModelConfig | str, batch: int, *, guided: bool = True, element_size: int = 4
) -> int:
    """K and V of all L tokens in every layer for the 2B CFG rows (B without guidance):
    2·depth·rows·L·C·element_size (docs/counting.md §5; docs/var.md §3.5). MVAR keeps no cache: 0."""
    cfg = _config(cfg)
    if cfg.arch != "var":
        return 0
    rows = 2 * batch if guided else batch
    return 2 * cfg.depth * rows * cfg.seq_len * cfg.embed_dim * element_size


def _is_concrete(t: Tensor) -> bool:
    """Whether a tensor holds real values (not meta, not a fake tensor)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


class AttentionCounter:
    """Count attention MACs of a model by hooking its attention cores (context manager).

    Per call with q of shape (B, H, lq, c) (C = H·c): qkv = lq·3C² per row; pairs per row =
    lq·L for an unmasked dense call, the allowed (finite) entries of ``attn_bias`` when a mask
    is given, lq·kh·kw for neighbourhood attention. Each call's count is divided by its B rows,
    so a CFG run (2B rows, both halves alike) yields the conditional per-image count.

    A mask must hold real values to be counted; under fake/meta tensors only unmasked calls
    (sampling) can be counted, and a masked call raises rather than guessing.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0
        self._qkv = 0.0
        self._pairs_C = 0.0  # Σ pairs·C per row (= q·kᵀ MACs = attention·v MACs)
        self._pairs = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        cores = [
            m
            for m in self.model.modules()
            if isinstance(m, (DenseAttention, NeighbourhoodAttention))
        ]
        if not cores:
            raise ValueError(
                f"{type(self.model).__name__} has no DenseAttention/NeighbourhoodAttention module "
                "to count (mvar.blocks)"
            )
        for m in cores:
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Arguments by the cores' declared names (``DenseAttention.forward(q_BHlc, k_BHLc,
        # v_BHLc, attn_bias)``, ``NeighbourhoodAttention.forward(q_BHlc, k_BHlc, v_BHlc,
        # grid_hw)``), however the caller passed them.
        call = inspect.signature(module.forward).bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        q = a["q_BHlc"]
        _, H, lq, c = q.shape
        C = H * c
        if isinstance(module, NeighbourhoodAttention):
            grid = a["grid_hw"]
            k = module.kernel_size
            pairs_row = lq * min(k, grid[0]) * min(k, grid[1])
        else:
            Lk = a["k_BHLc"].shape[2]
            bias = a["attn_bias"]
            if bias is None:
                pairs_row = lq * Lk
            else:
                if not _is_concrete(bias):
                    raise RuntimeError(
                        "a masked attention call under fake/meta tensors: the mask's allowed "
                        "entries are unknown; count with a real model or an unmasked run "
                        "(sampling)"
                    )
                b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
                allowed = torch.isfinite(b4).expand(b4.shape[0], b4.shape[1], lq, Lk)
                # Entries per (row, head) in the mask; a mask shared over rows/heads counts once.
                pairs_row = allowed.sum().item() / (b4.shape[0] * b4.shape[1])
        self.calls += 1
        self._qkv += lq * 3 * C * C  # per row: the qkv projection of this call's queries
        self._pairs += pairs_row
        self._pairs_C += pairs_row * C

    def result(self) -> AttentionMacs:
        qk = round(self._pairs_C)
        return AttentionMacs(qkv=round(self._qkv), qk=qk, av=qk, pairs=round(self._pairs))
