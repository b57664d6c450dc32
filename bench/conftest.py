"""pytest configuration shared by the benchmarks in ``bench/``.

- ``pytest bench`` collects the ``bench_*.py`` files (``python_files`` in pyproject.toml).
- The ``record_skip`` fixture skips a benchmark *and* keeps a row for it: the parameters and
  the status (``skipped: <reason>`` or ``oom``) go into the pytest-benchmark JSON under
  ``"skipped"``, so ``bench/to_csv.py`` writes a CSV row for every cell of the grid, measured
  or not (TorchBench's habit: a missing number says why it is missing).
- Every JSON gets the environment in ``machine_info``: torch version, git SHA, thread counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mvar.env import git_sha

_SKIPS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SKIPS] = []



@pytest.fixture
def record_skip(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record_skip(info, reason, status=None)``: keep a row for this cell, then skip it."""

    def _record(info: dict[str, Any], reason: str, status: str | None = None) -> None:
        row = dict(info)
        row["status"] = status or f"skipped: {reason}"
        row["test"] = request.node.nodeid
        request.config.stash[_SKIPS].append(row)
        pytest.skip(reason)

    return _record


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["git_sha"] = git_sha()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    )


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    output_json["skipped"] = list(config.stash.get(_SKIPS, []))
