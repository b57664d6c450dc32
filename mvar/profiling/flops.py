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
from torch.utils._python_dispatch import TorchDispatchMode

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


def core_call_pairs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int, float]:
    """(rows B, queries lq, width C, query-key pairs per row) of one call of an attention core.

    Pairs per row: lq·L for an unmasked dense call, the allowed (finite) entries of
    ``attn_bias`` when a mask is given, lq·kh·kw for neighbourhood attention (NATTEN's window
    never truncates, docs/counting.md §2).
    """
    # Arguments by the cores' declared names (``DenseAttention.forward(q_BHlc, k_BHLc,
    # v_BHLc, attn_bias)``, ``NeighbourhoodAttention.forward(q_BHlc, k_BHlc, v_BHlc,
    # grid_hw)``), however the caller passed them.
    call = inspect.signature(module.forward).bind(*args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    q = a["q_BHlc"]
    B, H, lq, c = q.shape
    if isinstance(module, NeighbourhoodAttention):
        grid = a["grid_hw"]
        k = module.kernel_size
        return B, lq, H * c, float(lq * min(k, grid[0]) * min(k, grid[1]))
    Lk = a["k_BHLc"].shape[2]
    bias = a["attn_bias"]
    if bias is None:
        return B, lq, H * c, float(lq * Lk)
    if not _is_concrete(bias):
        raise RuntimeError(
            "a masked attention call under fake/meta tensors: the mask's allowed "
            "entries are unknown; count with a real model or an unmasked run "
            "(sampling)"
        )
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    allowed = torch.isfinite(b4).expand(b4.shape[0], b4.shape[1], lq, Lk)
    # Entries per (row, head) in the mask; a mask shared over rows/heads counts once.
    return B, lq, H * c, allowed.sum().item() / (b4.shape[0] * b4.shape[1])


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
        _rows, lq, C, pairs_row = core_call_pairs(module, args, kwargs)
        self.calls += 1
        self._qkv += lq * 3 * C * C  # per row: the qkv projection of this call's queries
        self._pairs += pairs_row
        self._pairs_C += pairs_row * C

    def result(self) -> AttentionMacs:
        qk = round(self._pairs_C)
        return AttentionMacs(qkv=round(self._qkv), qk=qk, av=qk, pairs=round(self._pairs))


# --- full-model multiply-accumulates (docs/counting.md §4) ------------------------------------
def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _conv_macs(args: tuple, out: Tensor) -> int:
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, out_pad, groups)
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    # Each output element (input element, when transposed) takes weight[1]·prod(kernel) MACs:
    # weight is (Cout, Cin/groups, *k), or (Cin, Cout/groups, *k) when transposed.
    per = int(w.shape[1]) * _numel(w.shape[2:])
    return (_numel(x.shape) if transposed else _numel(out.shape)) * per


def _sdpa_macs(args: tuple) -> int:
    # Fused SDPA kernels: q (B, H, l, c), k (B, H, L, c), v (B, H, L, cv); a fused kernel
    # computes every pair (a mask is applied to the scores, not skipped).
    q, k, v = args[0], args[1], args[2]
    return _numel(q.shape[:-1]) * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))


def _matmul_op_macs(name: str, args: tuple, out: Any) -> int | None:
    """Multiply-accumulates of one aten op, or None for an op that does no matmul/conv.

    ``aten.linear``, ``matmul`` and ``einsum`` are composite: they reach a dispatch mode as the
    ``mm``/``addmm``/``bmm`` calls below, so every ``nn.Linear`` is counted here.
    """
    if name in ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot"):
        a = args[1] if name.startswith("add") or name == "baddbmm" else args[0]
        # out has every dimension but the contracted one, the contracted one is a's last.
        return _numel(out.shape) * int(a.shape[-1])
    if name in ("convolution", "_convolution"):
        return _conv_macs(args, out)
    if name.startswith("_scaled_dot_product") or name in (
        "_flash_attention_forward", "_efficient_attention_forward",
    ):  # fmt: skip
        return _sdpa_macs(args)
    return None


@dataclass(frozen=True)
class ModelMacs:
    """Multiply-accumulates of one counted sampling run, summed over all its rows (both halves
    of a guided batch), by where they ran (docs/counting.md §4).

    * ``transformer``: every matmul, linear and convolution dispatched inside the transformer's
      modules outside its attention cores (qkv, output projection, MLP, AdaLN, ``word_embed``,
      head), plus ``attention_core``;
    * ``attention_core``: q·kᵀ and attention·v, C MACs each per allowed query-key pair (the
      kernel-independent count of §1, from the cores' inputs);
    * ``attention_core_dispatched``: what the attention kernels that ran dispatched instead
      (backend-dependent: MVAR's neighbourhood scales under the ``dense`` backend compute
      every pair of the scale and mask most of them); not in ``transformer``;
    * ``vae``: the VQ-VAE's modules (the quantizer's φ convolutions while sampling, the decoder
      when decoding);
    * ``other``: matmuls outside any module of either model (none in this project's sampler).
    """

    images: int
    rows: int
    transformer: int
    attention_core: int
    attention_core_dispatched: int
    vae: int
    other: int

    def per_image(self, macs: int) -> float:
        return macs / self.images

    @property
    def full_gflops_per_image(self) -> float:
        """The transformer's MACs per generated image (guidance rows included) / 1e9."""
        return self.per_image(self.transformer + self.other) / 1e9

    @property
    def vae_gflops_per_image(self) -> float:
        return self.per_image(self.vae) / 1e9


class ModelFlopCounter(TorchDispatchMode):
    """Count the multiply-accumulates of every aten matmul/convolution a run dispatches,
    attributed to the transformer, its attention cores or the VQ-VAE by module hooks (context
    manager; works on real, meta and fake tensors).

    Ops run inside an attention core (``DenseAttention`` / ``NeighbourhoodAttention``) are kept
    apart (``attention_core_dispatched``) and the core is counted by its allowed pairs instead,
    as the attention-GFLOPs convention does (docs/counting.md §1, §4). ``images`` is the number
    of generated images the totals are divided by.
    """

    def __init__(self, model: nn.Module, vae: nn.Module | None = None, *, images: int) -> None:
        super().__init__()
        if images < 1:
            raise ValueError(f"images must be >= 1, got {images}")
        self.model, self.vae, self.images = model, vae, images
        self.macs: dict[str, int] = {k: 0 for k in ("transformer", "attention_core_dispatched",
                                                     "vae", "other")}  # fmt: skip
        self.core_macs = 0
        self.max_rows = 0
        self._stack: list[str] = []
        self._handles: list[Any] = []

    def _tag(self, tag: str) -> tuple[Any, Any]:
        def pre(_m: nn.Module, _args: tuple) -> None:
            self._stack.append(tag)

        def post(_m: nn.Module, _args: tuple, _out: Any) -> None:
            self._stack.pop()

        return pre, post

    def _core_post(self, module: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
        self._stack.pop()
        rows, _lq, C, pairs_row = core_call_pairs(module, args, kwargs)
        self.core_macs += round(2 * C * pairs_row * rows)  # q·kᵀ and attention·v
        self.max_rows = max(self.max_rows, rows)

    def __enter__(self) -> Self:
        owners = [(self.model, "transformer")] + ([(self.vae, "vae")] if self.vae is not None else [])
        for root, tag in owners:
            for m in root.modules():
                if isinstance(m, (DenseAttention, NeighbourhoodAttention)):
                    pre, _ = self._tag("attention_core_dispatched")
                    self._handles.append(m.register_forward_pre_hook(pre))
                    self._handles.append(m.register_forward_hook(self._core_post, with_kwargs=True))
                else:
                    pre, post = self._tag(tag)
                    self._handles.append(m.register_forward_pre_hook(pre))
                    self._handles.append(m.register_forward_hook(post))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        macs = _matmul_op_macs(func._overloadpacket.__name__, args, out)
        if macs:
            self.macs[self._stack[-1] if self._stack else "other"] += macs
        return out

    def result(self) -> ModelMacs:
        return ModelMacs(
            images=self.images, rows=self.max_rows,
            transformer=self.macs["transformer"] + self.core_macs, attention_core=self.core_macs,
            attention_core_dispatched=self.macs["attention_core_dispatched"],
            vae=self.macs["vae"], other=self.macs["other"],
        )  # fmt: skip


def analytic_sampling_macs(cfg: ModelConfig | str, *, guided: bool = True) -> int:
    """Closed form of the transformer's MACs per generated image as the sampler runs it
    (docs/counting.md §4), the count :class:`ModelFlopCounter` must reproduce.

    Per row (2 per image with guidance, the unconditional half costs the same): per layer
    12·C² per token (qkv 3C², output projection C², MLP 8C²), 2·C per query-key pair and the
    AdaLN projection 6·C² once per scale (the sampler runs each scale's blocks separately; one
    shared projection for ``shared_aln``); the head's AdaLN 2·C² per scale and the head V·C
    per token. Once per image (``word_embed`` runs before the rows are doubled): Cvae·C for
    each of the L − first_l input tokens.
    """
    cfg = _config(cfg)
    C, L, d, S = cfg.embed_dim, cfg.seq_len, cfg.depth, len(cfg.patch_nums)
    pairs = sum(attention_pairs_per_scale(cfg))
    ada = S * 6 * C * C * (1 if cfg.shared_aln else d)
    per_row = d * (12 * C * C * L + 2 * C * pairs) + ada + S * 2 * C * C + cfg.vocab_size * C * L
    first_l = cfg.patch_nums[0] ** 2
    return (2 if guided else 1) * per_row + cfg.Cvae * C * (L - first_l)
