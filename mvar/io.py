"""Files a long job reads and writes.

- Atomic writes: a long job killed mid-write leaves the old file or the new one, never half of
  one (training checkpoints, sample PNGs, npz files, report CSVs). Temporaries are named
  ``.<name>.<random>.tmp`` next to the target; :func:`remove_stale_temps` clears those a
  killed run left behind. Finished files get the usual ``0666 & ~umask`` mode (``mkstemp``
  alone would leave them 0600).
- Safe loading of weights files: :func:`safe_torch_load` is the one place a ``.pth`` a user
  hands us is read, always with ``torch.load(weights_only=True)`` (no code execution), with
  an error that says what was wrong without passing on torch's advice to disable that.
- Progress in logs: :func:`progress` wraps an iterable with a tqdm bar on a terminal *and*
  periodic log lines, so batch jobs (no TTY) still report how far they are.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Seconds between progress log lines (``$MVAR_PROGRESS_EVERY`` overrides).
PROGRESS_EVERY_S = 60.0


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically
    (same directory, so ``os.replace`` is a rename), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file follows umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temps(folder: str | os.PathLike[str], name: str = "*") -> int:
    """Delete ``.<name>.*.tmp`` files (our atomic-write temporaries) in ``folder``, left by a
    killed run; call before a job starts writing there. Returns how many were removed."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for stale in folder.glob(f".{name}.*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
                n += 1
    if n:
        log.info("removed %d stale temporary file(s) in %s", n, folder)
    return n


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """Fail before any work if ``path`` cannot become a file: it is a directory, or its parent
    is a file or not writable. Creates the parent directory."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory; expected a file path")
    parent = p.parent
    for anc in (parent, *parent.parents):
        if anc.exists():
            if not anc.is_dir():
                raise ValueError(f"{what} {p}: {anc} is a file, not a directory")
            break
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {p}: directory {parent} is not writable")
    return p


class UnsafeOrUnreadableFile(ValueError):
    """A weights file that is not a plain torch.save of tensors (or cannot be read)."""


def safe_torch_load(path: str | os.PathLike[str], what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. Every weights file a user hands us
    (checkpoints, the VQ-VAE, Inception weights) is read here and nowhere else, so no file can
    run code when loaded. Errors name the file and say what was wrong in one line."""
    p = Path(path)
    if p.is_dir():
        raise UnsafeOrUnreadableFile(f"{what} {p} is a directory; expected a .pth file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running the file's code: never pass
        # that on. Name the offending global instead (the last line of torch's message).
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        culprit = f" (found {found.group(1)})" if found else ""
        raise UnsafeOrUnreadableFile(
            f"{what} {p} holds Python objects other than tensors and containers{culprit}, which "
            f"are refused (unpickling them could run code); expected a state dict saved with "
            f"torch.save"
        ) from None
    except Exception as e:  # noqa: BLE001  (zip/EOF/format errors all mean the same here)
        size = p.stat().st_size if p.exists() else 0
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise UnsafeOrUnreadableFile(
            f"{what} {p} ({size:,} bytes) is not a readable torch.save file (truncated "
            f"download, or another format): {type(e).__name__}: {first}"
        ) from None


def progress(
    items: Iterable[T],
    total: int | None,
    desc: str,
    logger: logging.Logger | None = None,
    unit: str = "it",
    every_s: float | None = None,
    weight: Callable[[T], int] | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Yield ``items`` with a tqdm bar (terminals only) and a log line every ``every_s``
    seconds and at the end (``done / total unit, rate, ETA``), so that a job whose output goes
    to a log file still reports progress. ``weight(item)`` counts units per item (default 1).
    ``enabled=False`` (other ranks) yields silently."""
    lg = logger or log
    every = float(os.environ.get("MVAR_PROGRESS_EVERY", every_s or PROGRESS_EVERY_S))
    t0 = last = time.monotonic()
    done = 0
    with tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True) as bar:
        for item in items:
            yield item
            n = weight(item) if weight is not None else 1
            done += n
            bar.update(n)
            now = time.monotonic()
            if enabled and now - last >= every:
                last = now
                rate = done / max(now - t0, 1e-9)
                eta = f", ETA {(total - done) / rate:.0f} s" if total and rate > 0 else ""
                of = f"/{total}" if total is not None else ""
                lg.info("%s: %d%s %s (%.2f %s/s%s)", desc, done, of, unit, rate, unit, eta)
    if enabled:
        lg.info("%s: done, %d %s in %.1f s", desc, done, unit, time.monotonic() - t0)
