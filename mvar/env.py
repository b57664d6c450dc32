"""Where a result was produced: device name and git SHA, recorded with every result row."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def _cpu_name() -> str:
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        None)  # fmt: skip
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"cpu: {name} ({os.cpu_count()} cores)"


def device_name(device: torch.device | str | None = None) -> str:
    """A human-readable device name (``cuda: NVIDIA RTX 4090`` / ``cpu: <model> (N cores)``)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return _cpu_name()
    return device.type


def git_sha(repo: str | Path | None = None) -> str:
    """HEAD's SHA of the checkout, with ``-dirty`` when tracked files outside ``reports/`` have
    changes (so a result row never claims a commit it was not produced from; the reports are
    outputs, rewritten by the very runs that ask); ``$GIT_SHA`` or "unknown" without git."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                 timeout=10, check=False)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return os.environ.get("GIT_SHA", "unknown")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports")
    return sha + ("-dirty" if changed else "")
