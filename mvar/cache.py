"""A content-keyed artifact cache: trained models, token caches and sample sets are stored under
a key that hashes everything that produced them -- the stage's configuration, the content hashes
of its inputs and the source code of the library -- so an identical re-run reuses them and any
change rebuilds them. Nothing is ever found by file name alone.

Layout: ``<root>/<stage>-<key[:16]>/`` holds the artifact's files and, once complete,
``manifest.json`` (the full key, what went into it, the build's own report and wall time). A
folder without a manifest is work in progress: a build that was killed resumes there (the
trainers resume from their ``last.pth``), since the same key means the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvar.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The library that produces artifacts: any change to it retrains (coarse, but never stale).
CODE_ROOTS: tuple[str, ...] = ("mvar", "baselines")


def code_fingerprint(extra: Iterable[str | Path] = (), roots: Iterable[str] = CODE_ROOTS) -> str:
    """sha256 over the relative path and bytes of every ``*.py`` under ``roots`` (relative to
    the repository) plus the ``extra`` files, in sorted order."""
    files = sorted({p for r in roots for p in (REPO_ROOT / r).rglob("*.py")}
                   | {Path(e).resolve() for e in extra})  # fmt: skip
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p
        h.update(str(rel).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """JSON-able form with sorted keys; tuples become lists, Paths strings."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:
        raise ValueError("NaN in a cache key")
    return obj


@dataclass(frozen=True)
class Artifact:
    """A completed cache entry: its folder, full key and manifest."""

    stage: str
    path: Path
    key: str
    manifest: dict[str, Any]
    reused: bool

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.get("info", {})


class ArtifactCache:
    def __init__(self, root: str | Path, code: str) -> None:
        self.root = Path(root)
        self.code = code

    def key(self, stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
        blob = json.dumps(
            _canonical({"stage": stage, "config": config, "inputs": inputs, "code": self.code}),
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def folder(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}"

    def get_or_build(
        self,
        stage: str,
        config: dict[str, Any],
        inputs: dict[str, str],
        build: Callable[[Path], dict[str, Any]],
    ) -> Artifact:
        """The artifact of (stage, config, inputs, code): reused when its manifest holds the same
        full key, else built by ``build(folder)``, which returns a JSON-able report stored in
        the manifest. A folder whose manifest has another key (a 64-bit prefix collision) is an
        error, never reused."""
        key = self.key(stage, config, inputs)
        folder = self.folder(stage, key)
        manifest_path = folder / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") != key:
                raise RuntimeError(
                    f"{manifest_path} belongs to another key ({manifest.get('key')!r}, expected "
                    f"{key!r}); delete {folder}"
                )
            log.info("%s: reusing %s (same config, inputs and code)", stage, folder)
            return Artifact(stage, folder, key, manifest, reused=True)
        resumed = folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        log.info("%s: %s in %s", stage, "resuming" if resumed else "building", folder)
        t0 = time.perf_counter()
        info = build(folder)
        manifest = {
            "key": key, "stage": stage, "config": _canonical(config), "inputs": inputs,
            "code": self.code, "info": _canonical(info),
            "build_seconds": time.perf_counter() - t0, "resumed": resumed,
        }  # fmt: skip
        atomic_write_json(manifest_path, manifest)
        return Artifact(stage, folder, key, manifest, reused=False)
