"""Provenance: ``git_sha`` marks a checkout dirty for code changes, not for rewritten reports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mvar.env import git_sha


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_sha_dirty_for_code_not_for_reports(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "t.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_sha(tmp_path)
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "reports" / "t.csv").write_text("b\n")
    assert git_sha(tmp_path) == clean  # a rewritten report is an output, not a code change
    (tmp_path / "untracked.py").write_text("")
    assert git_sha(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == clean + "-dirty"
