"""Tiny ``torch.distributed`` helpers: one process or a ``torchrun`` job, nothing else.

``torchrun`` (and our test harness) describe the job through the environment variables
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without them
the process runs alone and every helper answers as rank 0 of 1, so library code calls
``get_rank()`` / ``barrier()`` unconditionally.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE``), 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by the environment; a no-op for a single process.

    Returns whether a (multi-process) group is active. ``backend`` defaults to NCCL when CUDA
    is available and gloo otherwise (gloo is what the CPU tests use).
    """
    if is_initialized():
        return True
    if env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set; launch with "
            "torchrun (which sets RANK, MASTER_ADDR, MASTER_PORT) or unset WORLD_SIZE"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info("joined %s process group: rank %d of %d", backend, get_rank(), get_world_size())
    return True


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; nothing to wait for in a single process."""
    if is_initialized():
        tdist.barrier()


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def default_device() -> torch.device:
    """This rank's device: its own GPU under torchrun (``LOCAL_RANK``), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")
