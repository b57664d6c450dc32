"""The device's used memory polled through NVML from a thread (NVML keeps no peak)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


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
