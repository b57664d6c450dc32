"""Memory instruments: the live-bytes tracker (a peak-memory estimate that allocates nothing
under ``FakeTensorMode``) and torch's CUDA allocator peaks around a block.

:class:`LiveBytesTracker` stands in for ``torch.cuda.max_memory_allocated``: it follows every
live tensor storage (weights, KV cache, activations, grads, optimizer state), each rounded up
to the CUDA caching allocator's 512-byte blocks; it does **not** include allocator caching /
fragmentation (``max_memory_reserved``), the CUDA context, or kernel workspaces.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mvar.profiling.nvml import NvmlPeakPoller, NvmlReading

MiB = 2**20
# The CUDA caching allocator hands out blocks in multiples of 512 bytes, and
# ``max_memory_allocated`` counts those block sizes; the estimate rounds the same way.
CUDA_BLOCK_BYTES = 512


def mib(nbytes: float) -> float:
    return nbytes / MiB


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
