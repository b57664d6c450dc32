"""Efficiency profiling of VAR and MVAR: the compute columns of Table 2 and of the ablation.

What is measured, and how (every function states its method; see ``repro/report.py`` for the
``method`` vocabulary):

* **Attention-block FLOPs** (``counted``): :class:`AttentionCounter` hooks every
  ``DenseAttention`` / ``NeighbourhoodAttention`` of a real model and counts, per call, the
  qkv projection (3·C² per query token), q·kᵀ and attention·v (C per query-key pair each) as
  multiply-accumulates, per image (each call's count divided by its batch rows). This is the
  paper's convention (docs/counting.md §1): MACs not 2× FLOPs,
  conditional branch only, output projection and MLP excluded. Paper-size models run under
  ``FakeTensorMode``, so d24 costs nothing. :func:`analytic_attention_macs` is the closed form.
* **KV cache** (``counted``): bytes of the VAR sampler's actual K/V tensors at the end of
  sampling (``SampleOutput.kv_cache_bytes``); 0 for MVAR, which has none (docs/mvar.md §1).
* **Peak memory without a GPU** (``estimated``): :class:`LiveBytesTracker`, a
  ``TorchDispatchMode`` that follows the live tensor storages of a run under ``FakeTensorMode``
  (nothing is allocated), each rounded up to the CUDA caching allocator's 512-byte blocks. It
  stands in for ``torch.cuda.max_memory_allocated`` and includes every tensor alive at the peak
  (weights, KV cache, activations, grads, optimizer state); it does **not** include allocator
  caching/fragmentation (``max_memory_reserved``), the CUDA context, or kernel workspaces.
* **Peak memory on a GPU** (``measured``): ``torch.cuda`` max-allocated and max-reserved, plus
  the device's used memory polled through NVML from a thread (:class:`NvmlPeakPoller`), which
  degrades to a status string when no driver is present.
* **Latency** (``measured``): :func:`time_call`, synchronised, warm-up excluded, median.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mvar.blocks import DenseAttention, NeighbourhoodAttention
from mvar.config import ModelConfig, get_preset

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

MiB = 2**20
# The CUDA caching allocator hands out blocks in multiples of 512 bytes, and
# ``max_memory_allocated`` counts those block sizes; the estimate rounds the same way.
CUDA_BLOCK_BYTES = 512


def _config(cfg: ModelConfig | str) -> ModelConfig:
    return get_preset(cfg) if isinstance(cfg, str) else cfg


# =============================================================================================
# Attention FLOPs: closed form and counting hooks
# =============================================================================================


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
        q = args[0] if args else kwargs["q_BHlc"]
        _, H, lq, c = q.shape
        C = H * c
        if isinstance(module, NeighbourhoodAttention):
            grid = args[3] if len(args) > 3 else kwargs["grid_hw"]
            k = module.kernel_size
            pairs_row = lq * min(k, grid[0]) * min(k, grid[1])
        else:
            k_t = args[1] if len(args) > 1 else kwargs["k_BHLc"]
            Lk = k_t.shape[2]
            bias = args[3] if len(args) > 3 else kwargs.get("attn_bias")
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
                per_row_head = allowed.sum().item() / (b4.shape[0] * b4.shape[1])
                pairs_row = per_row_head
        self.calls += 1
        self._qkv += lq * 3 * C * C  # per row: the qkv projection of this call's queries
        self._pairs += pairs_row
        self._pairs_C += pairs_row * C

    def result(self) -> AttentionMacs:
        qk = round(self._pairs_C)
        return AttentionMacs(qkv=round(self._qkv), qk=qk, av=qk, pairs=round(self._pairs))


# =============================================================================================
# Live tensor bytes (peak-memory estimate) under FakeTensorMode
# =============================================================================================


class LiveBytesTracker(TorchDispatchMode):
    """Peak of live tensor bytes, followed storage by storage through the dispatcher.

    Every storage produced by an op is counted once (views share it) until Python frees it
    (a weak reference on the storage). Tensors that existed before (weights) are added with
    :meth:`track`. Each storage is rounded up to ``round_to`` bytes (CUDA's 512-byte blocks by
    default; 1 for exact bytes). :meth:`phase` records the peak inside a named phase, and
    ``peak_by_category`` is the split of the global peak by category (``track``'s categories,
    created tensors under the current phase's name, or ``"activations"``).

    Use it on top of a ``FakeTensorMode`` (``with fake_mode, tracker:``) to estimate paper-size
    runs without allocating; on real tensors it tracks real allocations the same way.
    """

    def __init__(self, round_to: int = CUDA_BLOCK_BYTES) -> None:
        super().__init__()
        self.round_to = max(1, round_to)
        self.current = 0
        self.peak = 0
        self.by_category: dict[str, int] = {}
        self.peak_by_category: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self._live: dict[int, tuple[int, str, weakref.ref]] = {}
        self._category = "activations"
        self._phase_peak: int | None = None

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def _add(self, t: Tensor, category: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        n = self._rounded(st.nbytes())
        ref = weakref.ref(st, lambda _r, key=key: self._free(key))
        self._live[key] = (n, category, ref)
        self.current += n
        self.by_category[category] = self.by_category.get(category, 0) + n
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_category = dict(self.by_category)
        if self._phase_peak is not None and self.current > self._phase_peak:
            self._phase_peak = self.current

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            n, category, _ = entry
            self.current -= n
            self.by_category[category] -= n

    def track(self, tensors: Iterable[Tensor], category: str = "weights") -> int:
        """Count pre-existing tensors (weights, buffers, inputs); returns the bytes added."""
        before = self.current
        for t in tensors:
            if t is not None:
                self._add(t, category)
        return self.current - before

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record ``phase_peaks[name]``: the peak of all live bytes while inside; tensors
        created inside are categorised as ``name``."""
        outer_cat, outer_peak = self._category, self._phase_peak
        self._category, self._phase_peak = name, self.current
        try:
            yield
        finally:
            peak = self._phase_peak
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), peak or 0)
            self._category = outer_cat
            self._phase_peak = None if outer_peak is None else max(outer_peak, peak or 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t, self._category)
        return out


def module_tensors(*modules: nn.Module) -> list[Tensor]:
    """Parameters and buffers of modules (what sits in memory before a run starts)."""
    out: list[Tensor] = []
    for m in modules:
        out += list(m.parameters()) + list(m.buffers())
    return out


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Exact bytes of distinct storages (views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


# =============================================================================================
# GPU memory: NVML device peak from a polling thread
# =============================================================================================


@dataclass(frozen=True)
class NvmlReading:
    """Device memory seen by NVML (all processes, CUDA context included)."""

    status: str  # "ok" or "not measured: <why>"
    baseline_bytes: int | None = None  # used memory when polling started
    peak_bytes: int | None = None  # highest used memory polled
    samples: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class NvmlPeakPoller:
    """Poll ``nvmlDeviceGetMemoryInfo(handle).used`` from a thread (NVML has no peak counter,
    docs/counting.md §6). Without a driver or the library the poller does nothing and its
    :attr:`reading` says why; it never raises for that.

    ``device_index`` is NVML's index; where torch can name the device's PCI bus the poller
    matches by bus id instead, so ``CUDA_VISIBLE_DEVICES`` remapping does not confuse it.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.002) -> None:
        self.device_index = device_index
        self.interval_s = interval_s
        self._status = "not measured: poller not started"
        self._baseline: int | None = None
        self._peak: int | None = None
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None

    def __enter__(self) -> Self:
        try:
            import pynvml
        except ImportError as e:
            self._status = f"not measured: nvidia-ml-py (pynvml) is not installed ({e})"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self._status = f"not measured: NVML unavailable ({type(e).__name__}: {e})"
            return self
        self._nvml = pynvml
        try:
            self._handle = self._find_handle(pynvml)
            used = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except pynvml.NVMLError as e:
            self._status = f"not measured: NVML query failed ({type(e).__name__}: {e})"
            self._shutdown()
            return self
        self._baseline = self._peak = used
        self._samples = 1
        self._status = "ok"
        self._thread = threading.Thread(target=self._poll, name="nvml-peak", daemon=True)
        self._thread.start()
        return self

    def _find_handle(self, pynvml: Any) -> Any:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            bus = getattr(props, "pci_bus_id", None)
            domain = getattr(props, "pci_domain_id", None)
            device = getattr(props, "pci_device_id", None)
            if bus is not None and domain is not None and device is not None:
                try:
                    pci = f"{domain:08x}:{bus:02x}:{device:02x}.0"
                    return pynvml.nvmlDeviceGetHandleByPciBusId(pci)
                except pynvml.NVMLError:
                    log.debug("NVML: no device at PCI %s; falling back to index", pci)
        return pynvml.nvmlDeviceGetHandleByIndex(self.device_index)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)
        self._sample()

    def _sample(self) -> None:
        try:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except self._nvml.NVMLError as e:  # driver went away mid-run: keep what we have
            self._status = f"not measured: NVML query failed mid-run ({type(e).__name__}: {e})"
            self._stop.set()
            return
        self._samples += 1
        if self._peak is None or used > self._peak:
            self._peak = used

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._shutdown()

    @property
    def reading(self) -> NvmlReading:
        if self._status != "ok":
            return NvmlReading(self._status, samples=self._samples)
        return NvmlReading("ok", self._baseline, self._peak, self._samples)


# =============================================================================================
# Timing
# =============================================================================================


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of a call: median over ``repeats`` after ``warmup`` untimed calls."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    device: str
    times_s: tuple[float, ...] = ()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
) -> Timing:
    """Time ``fn`` honestly: warm-up calls are not timed, the device is synchronised before
    and after every timed call, and the median is reported."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(
        statistics.median(times), min(times), max(times), repeats, warmup, str(device), tuple(times)
    )


# =============================================================================================
# Building models for counting / estimation
# =============================================================================================


# Neighbourhood attention under fake tensors runs through the ``dense`` backend: SDPA with a
# 0/1 mask, which (like NATTEN's fused kernel on a GPU) materialises no per-query window copy;
# the ``reference`` backend would gather [B, H, l, k*k, c] keys and values and inflate MVAR's
# memory estimate.
FAKE_NA_BACKEND = "dense"


@dataclass
class FakeModels:
    """A transformer and VQ-VAE whose tensors are fake (``FakeTensorMode``, device cpu);
    run them inside ``fake_mode``."""

    fake_mode: Any
    model: nn.Module
    vae: nn.Module


def build_fake(
    cfg: ModelConfig | str, *, train: bool = False, na_backend: str = FAKE_NA_BACKEND
) -> FakeModels:
    """Paper-size models at no cost: built on the meta device, then given fake CPU storage
    (``to_empty`` inside ``FakeTensorMode``; fake "cuda" tensors abort a CPU build). Values are
    undefined; only shapes, dtypes and the sequence of ops are real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mvar.build import build_model, build_vqvae

    cfg = _config(cfg)
    model = build_model(cfg, device="meta", init=False, na_backend=na_backend)
    vae = build_vqvae(cfg.vae, device="meta")
    # empty_like(meta tensor, device="cpu") has a non-fake input; allow it only for this.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model.to_empty(device="cpu")
        vae.to_empty(device="cpu")
    fake_mode.allow_non_fake_inputs = False
    model.train(train)
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return FakeModels(fake_mode, model, vae)


def _labels(batch: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.arange(batch, device=device) % 1000


# =============================================================================================
# Paper-size counts (fake tensors)
# =============================================================================================


@dataclass(frozen=True)
class SamplingCount:
    """What one counted sampling run gives: attention MACs per image and KV-cache bytes."""

    macs: AttentionMacs
    kv_cache_bytes: int
    batch: int
    cfg: float
    rows: int  # 2·batch with guidance, batch without


def count_sampling(
    cfg: ModelConfig | str,
    *,
    batch: int = 1,
    guidance: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    models: FakeModels | None = None,
) -> SamplingCount:
    """Run the real sampler (no decode) under ``FakeTensorMode`` (paper sizes in about a
    second) with :class:`AttentionCounter` hooks and read the KV cache bytes off its tensors.
    Guidance runs 2B rows; each call's count is divided by its rows."""
    cfg = _config(cfg)
    m = models or build_fake(cfg)
    with m.fake_mode:
        labels = _labels(batch)
        with AttentionCounter(m.model) as counter:
            out = m.model.sample(
                m.vae, labels, cfg=guidance, top_k=top_k, top_p=top_p, g_seed=0, decode=False
            )
    return SamplingCount(
        counter.result(), int(out.kv_cache_bytes), batch, guidance,
        2 * batch if out.guided else batch,
    )  # fmt: skip


# =============================================================================================
# Inference memory (estimate under fake tensors, or measured on a GPU)
# =============================================================================================


@dataclass(frozen=True)
class InferenceMemory:
    """Peak bytes of sampling one batch, by phase.

    ``tokens``: token generation (transformer + quantizer, ``decode=False``); ``decode``: VQ-VAE
    decode of the batch's f̂ to images; ``total``: both in one run (sampling with decode). All
    include the resident weights of the transformer and the whole VQ-VAE (``weights``).
    """

    model: str
    batch: int
    tokens: int
    decode: int
    total: int
    weights: int
    kv_cache: int
    method: str  # "estimated" (fake tensors) or "measured" (GPU)
    what: str  # which counter the numbers are (live bytes / max-allocated / ...)


def estimate_inference_memory(
    cfg: ModelConfig | str,
    batch: int,
    *,
    guidance: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    decode: bool = True,
    round_to: int = CUDA_BLOCK_BYTES,
    models: FakeModels | None = None,
    attention: str = "fused",
) -> InferenceMemory:
    """Estimate the sampling peak of a paper-size model under ``FakeTensorMode`` (fp32).

    The transformer and VQ-VAE weights are resident from the start (as when a model is loaded
    on a GPU); the peak then follows every live tensor: KV cache (VAR), activations, logits and
    their top-k/top-p copies, f̂, and in the decode phase the decoder's feature maps.
    ``decode=False`` skips the decode phase (``decode`` is then 0 and ``total == tokens``).
    ``models`` reuses fake models of the same config across calls.

    ``attention="fused"`` lets SDPA pick its fused CPU kernel (no score matrix, like flash /
    memory-efficient attention on a GPU); ``"math"`` forces the math kernel, which materialises
    the (rows, H, l, L) scores and their softmax as a non-fused implementation does. MVAR's
    neighbourhood scales then run as masked full attention (``dense`` backend), an upper bound
    for a real NA kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention not in ("fused", "math"):
        raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
    kernel = sdpa_kernel([SDPBackend.MATH]) if attention == "math" else nullcontext()
    cfg = _config(cfg)
    m = models or build_fake(cfg)
    tracker = LiveBytesTracker(round_to=round_to)
    tracker.track(module_tensors(m.model), "weights")
    tracker.track(module_tensors(m.vae), "vae_weights")
    weights = tracker.current
    with m.fake_mode, tracker, torch.no_grad(), kernel:
        labels = _labels(batch)
        with tracker.phase("tokens"):
            out = m.model.sample(
                m.vae, labels, cfg=guidance, top_k=top_k, top_p=top_p, g_seed=0, decode=False
            )
        kv = int(out.kv_cache_bytes)
        fhat = out.fhat
        del out  # the token ids stay only as f̂, as in sample(decode=True)
        if decode:
            with tracker.phase("decode"):
                m.vae.fhat_to_img(fhat)  # the whole batch at once
    peak_tokens = tracker.phase_peaks["tokens"]
    peak_decode = tracker.phase_peaks.get("decode", 0)
    return InferenceMemory(
        model=cfg.name, batch=batch, tokens=peak_tokens, decode=peak_decode,
        total=max(peak_tokens, peak_decode), weights=weights, kv_cache=kv,
        method="estimated",
        what=f"peak live tensor bytes under FakeTensorMode, {round_to}-byte blocks, "
        f"{attention} attention",
    )  # fmt: skip


@dataclass(frozen=True)
class CudaMemory:
    """One GPU measurement: torch's allocator peaks and the NVML device peak."""

    max_allocated: int
    max_reserved: int
    nvml: NvmlReading


@contextmanager
def cuda_memory(device: torch.device) -> Iterator[list[CudaMemory]]:
    """Measure a block on a GPU: reset torch's peak stats, poll NVML while inside; the yielded
    list receives one :class:`CudaMemory` on exit."""
    result: list[CudaMemory] = []
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with NvmlPeakPoller() as poller:
        yield result
        torch.cuda.synchronize(device)
    result.append(
        CudaMemory(
            torch.cuda.max_memory_allocated(device),
            torch.cuda.max_memory_reserved(device),
            poller.reading,
        )
    )


def measure_inference_cuda(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cuda",
    guidance: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    autocast_dtype: torch.dtype | None = None,
    phases: Sequence[str] = ("tokens", "decode", "total"),
) -> dict[str, CudaMemory]:
    """Real peak memory of sampling on a GPU (random weights: memory does not depend on them),
    per phase: ``tokens`` (decode=False), ``decode`` (f̂ → images), ``total`` (decode=True).
    fp32 unless ``autocast_dtype`` is given. One untimed warm-up sampling call comes first."""
    cfg, device = _config(cfg), torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("measure_inference_cuda needs a CUDA device")
    model, vae, labels = _real_models(cfg, batch, device)
    amp = _autocast(device, autocast_dtype)
    kw = {"cfg": guidance, "top_k": top_k, "top_p": top_p, "g_seed": 0}
    out: dict[str, CudaMemory] = {}
    with torch.no_grad(), amp:
        model.sample(vae, labels, decode=False, **kw)  # warm-up: kernels, workspaces
        torch.cuda.empty_cache()
        if "tokens" in phases or "decode" in phases:
            with cuda_memory(device) as r:
                res = model.sample(vae, labels, decode=False, **kw)
            out["tokens"] = r[0]
            if "decode" in phases:
                with cuda_memory(device) as r:
                    vae.fhat_to_img(res.fhat)
                out["decode"] = r[0]
            del res
            torch.cuda.empty_cache()
        if "total" in phases:
            with cuda_memory(device) as r:
                model.sample(vae, labels, decode=True, **kw)
            out["total"] = r[0]
    return out


# =============================================================================================
# Training step: memory (estimate or GPU) and time
# =============================================================================================


def train_chunks(cfg: ModelConfig | str) -> list[tuple[int, ...]]:
    """The scale groups one training iteration runs: VAR the full sequence (one group of all
    scales, block-causal); MVAR the official chunks (docs/mvar.md §3): all full-attention scales
    packed, then each neighbourhood scale alone (0–7, 8, 9 at 256 px). The ablation's
    scale-Markov-only variant has no NA scales; it is chunked like MVAR (0–7, 8, 9) since its
    scales are independent all the same."""
    cfg = _config(cfg)
    S = cfg.num_scales
    if cfg.arch == "var":
        return [tuple(range(S))]
    packed = tuple(si for si in range(S) if si < cfg.refine_step)
    return [packed] + [(si,) for si in range(S) if si >= cfg.refine_step]


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    labels: Tensor,
    x_BLCv: Tensor,
    targets_BL: Tensor,
    scales: Sequence[int],
    amp: Any,
) -> Tensor:
    """One iteration: forward of ``scales``, cross-entropy with per-token weight 1/L (not
    renormalised per chunk, docs/mvar.md §3), backward, AdamW step."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    be = cfg.begin_ends
    idx = torch.cat([torch.arange(*be[si], device=labels.device) for si in scales])
    with amp:
        if cfg.arch == "var":
            logits = model(labels, x_BLCv)
        else:
            logits = model(labels, x_BLCv, scales=scales)
    loss = F.cross_entropy(
        logits.float().reshape(-1, cfg.vocab_size), targets_BL[:, idx].reshape(-1), reduction="sum"
    ) / (labels.shape[0] * cfg.seq_len)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _real_models(
    cfg: ModelConfig, batch: int, device: torch.device
) -> tuple[nn.Module, nn.Module, Tensor]:
    """A randomly initialised transformer and VQ-VAE on ``device`` in eval mode, and labels."""
    from mvar.build import build_model, build_vqvae

    model = build_model(cfg, device=device).eval()
    vae = build_vqvae(cfg.vae, device=device).eval()
    return model, vae, _labels(batch, device)


def _real_train_setup(
    cfg: ModelConfig, batch: int, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, tuple[Tensor, ...]]:
    """A randomly initialised transformer in train mode, its AdamW and random inputs."""
    from mvar.build import build_model

    model = build_model(cfg, device=device).train()
    return model, _adamw(model, None), _train_inputs(cfg, batch, device)


def _adamw(model: nn.Module, foreach: bool | None) -> torch.optim.Optimizer:
    # docs/var.md §4: AdamW betas (0.9, 0.95), wd 0.05. Memory does not depend on the lr.
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, foreach=foreach,
    )  # fmt: skip


def _train_inputs(cfg: ModelConfig, batch: int, device: torch.device | str) -> tuple[Tensor, ...]:
    labels = _labels(batch, device)
    x_BLCv = torch.randn(batch, cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.Cvae, device=device)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    return labels, x_BLCv, targets


@dataclass(frozen=True)
class TrainMemory:
    """Peak bytes of one training iteration per chunk (``chunks[name]``) and their max.

    Each chunk's peak includes weights, gradients and AdamW state (``exp_avg``,
    ``exp_avg_sq``) present at that time, activations kept for backward and the optimizer
    step's temporaries. ``optimizer_state`` and ``grads`` are the bytes of those tensors.
    """

    model: str
    batch: int
    chunks: dict[str, int]
    peak: int
    weights: int
    grads: int
    optimizer_state: int
    method: str
    what: str


def chunk_name(scales: Sequence[int]) -> str:
    return f"{scales[0]}-{scales[-1]}" if len(scales) > 1 else str(scales[0])


def estimate_train_memory(
    cfg: ModelConfig | str,
    batch: int,
    *,
    round_to: int = CUDA_BLOCK_BYTES,
    foreach: bool = True,
) -> TrainMemory:
    """Estimate the fp32 training-step peak of a paper-size model under ``FakeTensorMode``.

    The optimizer state exists from the start (a steady-state iteration, not the first), and
    AdamW uses the multi-tensor (``foreach``) path that is PyTorch's CUDA default. Every chunk
    of :func:`train_chunks` is one iteration; its peak is recorded separately.
    """
    cfg = _config(cfg)
    m = build_fake(cfg, train=True)
    model = m.model
    with m.fake_mode:
        opt = _adamw(model, foreach)
        labels, x_BLCv, targets = _train_inputs(cfg, batch, "cpu")
        # Warm the optimizer state (exp_avg, exp_avg_sq, step) with one step on zero grads.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
    tracker = LiveBytesTracker(round_to=round_to)
    tracker.track(module_tensors(model), "weights")
    tracker.track(state, "optimizer_state")
    tracker.track((labels, x_BLCv, targets), "inputs")
    weights = tensor_bytes(module_tensors(model))
    chunks: dict[str, int] = {}
    with m.fake_mode, tracker:
        for scales in train_chunks(cfg):
            name = chunk_name(scales)
            with tracker.phase(name):
                _train_step(model, opt, labels, x_BLCv, targets, scales, nullcontext())
            chunks[name] = tracker.phase_peaks[name]
    grads = tensor_bytes(p for p in model.parameters() if p.requires_grad)  # one grad per param
    return TrainMemory(
        model=cfg.name, batch=batch, chunks=chunks, peak=max(chunks.values()), weights=weights,
        grads=grads, optimizer_state=tensor_bytes(state), method="estimated",
        what=f"peak live tensor bytes under FakeTensorMode, {round_to}-byte blocks, fp32, AdamW "
        f"foreach={foreach}",
    )  # fmt: skip


@dataclass(frozen=True)
class TrainTiming:
    """Seconds per iteration for each chunk and their mean (one chunk per iteration cycles
    through all chunks, so an iteration costs the mean on average)."""

    model: str
    batch: int
    chunks: dict[str, Timing]
    mean_s: float
    device: str


def time_train_step(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> TrainTiming:
    """Real timing of training iterations (random weights and inputs) on ``device``.

    Per chunk of :func:`train_chunks`: warm-up iterations untimed, then the median of
    ``repeats``. For MVAR, ``mean_s`` is the average over chunks, i.e. what an iteration costs
    over a cycle of the official trainer (one chunk per iteration)."""
    cfg, device = _config(cfg), torch.device(device)
    model, opt, (labels, x_BLCv, targets) = _real_train_setup(cfg, batch, device)
    amp = _autocast(device, autocast_dtype)
    out: dict[str, Timing] = {}
    for scales in train_chunks(cfg):
        out[chunk_name(scales)] = time_call(
            lambda s=scales: _train_step(model, opt, labels, x_BLCv, targets, s, amp),
            device=device, warmup=warmup, repeats=repeats,
        )  # fmt: skip
    mean = sum(t.median_s for t in out.values()) / len(out)
    return TrainTiming(cfg.name, batch, out, mean, str(device))


def measure_train_memory_cuda(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cuda",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, CudaMemory | str]:
    """Real training-step peak per chunk on a GPU (after one warm-up iteration of every chunk,
    so AdamW state exists). A chunk that runs out of memory is reported as ``"oom"``."""
    cfg, device = _config(cfg), torch.device(device)
    out: dict[str, CudaMemory | str] = {}
    try:
        model, opt, (labels, x_BLCv, targets) = _real_train_setup(cfg, batch, device)
    except torch.cuda.OutOfMemoryError:
        return {chunk_name(s): "oom" for s in train_chunks(cfg)}
    amp = _autocast(device, autocast_dtype)
    for scales in train_chunks(cfg):
        name = chunk_name(scales)
        try:
            _train_step(model, opt, labels, x_BLCv, targets, scales, amp)  # warm-up
            with cuda_memory(device) as r:
                _train_step(model, opt, labels, x_BLCv, targets, scales, amp)
            out[name] = r[0]
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            out[name] = "oom"
    return out


def time_sampling(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    guidance: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    decode: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> Timing:
    """Real latency of sampling one batch (random weights) on ``device``; token generation
    only unless ``decode``."""
    cfg, device = _config(cfg), torch.device(device)
    model, vae, labels = _real_models(cfg, batch, device)
    amp = _autocast(device, autocast_dtype)

    def run() -> None:
        with torch.no_grad(), amp:
            model.sample(
                vae, labels, cfg=guidance, top_k=top_k, top_p=top_p, g_seed=0, decode=decode
            )

    return time_call(run, device=device, warmup=warmup, repeats=repeats)


def mib(nbytes: float) -> float:
    return nbytes / MiB


def gflops_close(a: float, b: float, tol: float = 0.01) -> bool:
    """Paper GFLOPs cells are rounded (two differ from the exact count by one unit in the last
    digit, docs/counting.md §3), so compare within 0.01."""
    return math.isclose(a, b, abs_tol=tol + 1e-9)
