"""Honest wall-clock timing: warm-up excluded, device synchronised, median reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
