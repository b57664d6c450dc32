"""Sample the FID set: N images per class into a PNG folder, then pack an ADM-style npz.

Protocol (docs/evaluation.md §1, docs/mvar.md §5), as code:

- Labels are class-ordered: ``labels = [c0]*per_class + [c1]*per_class + ...``. They are cut
  into one *global* list of batches, batch ``b`` = ``labels[b*bs:(b+1)*bs]``, sampled with
  ``g_seed = seed + b`` (``seed_mode="per-batch"``, default) or ``g_seed = seed`` for every
  batch (``"fixed"``, the official MVAR evaluation). Because a batch's content and seed do not
  depend on who samples it, the images do not depend on the number of processes.
- Under ``torchrun``, rank r samples the batches b with b % world_size == r.
- Image i is ``{i:06d}.png`` (lossless). Each PNG is written to a temporary name and renamed,
  so a file that exists is complete; a batch whose PNGs all exist is skipped, so an
  interrupted run is resumed by running the same command again and ends with the same files.
- The folder name encodes every setting that changes pixels (model, checkpoint stem, guidance,
  top_k, top_p, more_smooth, seed and seed mode, classes, per class, batch size, uint8
  conversion, dtype); ``settings.json`` inside records them, and a folder whose
  ``settings.json`` disagrees is refused.
- float -> uint8: ``round`` = floor(x*255 + 0.5) (default), ``truncate`` = floor(x*255) (the
  official MVAR code: ``mul(255)`` then a uint8 cast). Both clamp to [0, 255].

CLI (one process, or ``torchrun --nproc_per_node G -m mvar.generate ...``)::

    python -m mvar.generate --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth \\
        --out-dir outputs/samples --npz
    python -m mvar.generate --model mvar-tiny --per-class 2 --num-classes 4   # random-init demo

``--model`` takes a model preset (``mvar-tiny``) or a released checkpoint name
(``mvar-finetune-d20``), which also selects the official sampling settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

from mvar import dist, precision
from mvar.config import CHECKPOINT_PRESETS, RELEASES, SamplingConfig, sampling_for
from mvar.io import atomic_path, atomic_write_json, progress, remove_stale_temps
from mvar.sampling import check_class_labels, check_sampling_settings

log = logging.getLogger(__name__)

Uint8Mode = Literal["round", "truncate"]
SeedMode = Literal["per-batch", "fixed"]
SETTINGS_FILE = "settings.json"
#: settings.json keys recorded for reading only, not compared on resume.
INFO_KEYS = frozenset({"git_sha"})
PNG_RE = re.compile(r"^(\d{6,})\.png$")


class Sampler(Protocol):
    """Anything that turns a batch of class labels and a seed into images in [0, 1]."""

    def sample(self, label_B: torch.Tensor, g_seed: int) -> torch.Tensor:
        """(B,) int64 labels -> (B, 3, H, W) float in [0, 1]; deterministic given g_seed."""
        ...


# --------------------------------------------------------------------------------------------
# Settings: the global batch partition and the folder name
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    model: str  # preset or released-checkpoint name
    checkpoint: str  # checkpoint file stem; "random-init" without one
    guidance: float
    top_k: int
    top_p: float
    more_smooth: bool = False
    seed: int = 0
    seed_mode: SeedMode = "per-batch"
    per_class: int = 50
    classes: tuple[int, ...] = tuple(range(1000))
    batch_size: int = 25
    uint8: Uint8Mode = "round"
    dtype: str = precision.DEFAULT_PRECISION  # mvar.precision: fp32 (parity), bf16, fp16 (GPU)
    # Content keys (fidelity: the folder is named by what made the pixels, not by file names).
    checkpoint_sha256: str = ""  # of the transformer file; "" = random init
    vae_checkpoint: str = "random-init"  # VQ-VAE file stem
    vae_sha256: str = ""  # of the VQ-VAE file; "" = random init
    na_backend: str = "none"  # neighbourhood-attention backend that runs ("none": VAR, ablation)
    device: str = "cpu"  # device type the images are sampled on (rounding differs)
    code_version: str = ""  # mvar version + git SHA; recorded and compared, not in the name

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.batch_size < 1 or not self.classes:
            raise ValueError(
                f"need per_class >= 1, batch_size >= 1 and at least one class; got "
                f"{self.per_class}, {self.batch_size}, {len(self.classes)} classes"
            )
        if self.uint8 not in ("round", "truncate"):
            raise ValueError(f"uint8 must be 'round' or 'truncate', got {self.uint8!r}")
        if self.seed_mode not in ("per-batch", "fixed"):
            raise ValueError(f"seed_mode must be 'per-batch' or 'fixed', got {self.seed_mode!r}")
        # Canonical name (torch's long names accepted), so that one precision is one folder.
        object.__setattr__(self, "dtype", precision.check_precision(self.dtype, self.device))
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if min(self.classes) < 0:
            raise ValueError(f"class {min(self.classes)} is out of range: class ids are >= 0")
        check_sampling_settings(self.guidance, self.top_k, self.top_p)

    @property
    def num_images(self) -> int:
        return self.per_class * len(self.classes)

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def labels(self) -> np.ndarray:
        """The class-ordered label of every image index."""
        return np.repeat(np.asarray(self.classes, dtype=np.int64), self.per_class)

    def rank_batches(self, rank: int, world: int) -> list[int]:
        """The batches rank ``rank`` of ``world`` samples: b % world == rank. The batches, their
        labels and seeds are global, so the images do not depend on the world size."""
        return list(range(rank, self.num_batches, world))

    def batch_range(self, b: int) -> range:
        return range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_images))

    def g_seed(self, b: int) -> int:
        return self.seed + b if self.seed_mode == "per-batch" else self.seed

    def _classes_tag(self) -> str:
        if self.classes == tuple(range(len(self.classes))):
            return f"cls{len(self.classes)}"
        digest = hashlib.sha256(",".join(map(str, self.classes)).encode()).hexdigest()[:8]
        return f"cls{len(self.classes)}-{digest}"

    def folder_name(self) -> str:
        seed = f"seed{self.seed}" + ("fixed" if self.seed_mode == "fixed" else "")
        ckpt = self.checkpoint + (f"-{self.checkpoint_sha256[:10]}" if self.checkpoint_sha256 else "")
        vae = "vae-" + (self.vae_sha256[:10] if self.vae_sha256 else self.vae_checkpoint)
        parts = [
            self.model,
            ckpt,
            vae,
            f"guidance{self.guidance:g}",
            f"topk{self.top_k}",
            f"topp{self.top_p:g}",
            f"smooth{int(self.more_smooth)}",
            seed,
            f"pc{self.per_class}",
            self._classes_tag(),
            f"bs{self.batch_size}",
            self.uint8,
            self.dtype,
            f"na-{self.na_backend}",
            self.device,
        ]
        return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", p) for p in parts)

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["num_images"] = self.num_images
        d["labels"] = "class-ordered: image i has class classes[i // per_class]"
        d["g_seed"] = "seed + batch index" if self.seed_mode == "per-batch" else "seed"
        d["content_key"] = self.content_key()
        from mvar.env import git_sha

        d["git_sha"] = git_sha()  # for reading; the compared code id is code_version
        return d

    def content_key(self) -> str:
        """sha256 (24 hex) of every setting: the id of what these pixels are."""
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:24]

    @classmethod
    def from_json(cls, d: dict[str, object]) -> GenerationSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["classes"] = tuple(kw["classes"])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


def png_name(i: int) -> str:
    return f"{i:06d}.png"


def to_uint8(img01_B3HW: torch.Tensor, mode: Uint8Mode = "round") -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 (see the module docstring for the modes)."""
    x = img01_B3HW.detach().float().mul(255.0)
    if mode == "round":
        x = x.add_(0.5)
    elif mode != "truncate":
        raise ValueError(f"uint8 mode must be 'round' or 'truncate', got {mode!r}")
    # The uint8 cast truncates toward zero, i.e. floors the clamped non-negative values.
    return x.clamp_(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _sample_files(folder: Path) -> list[Path]:
    """What a sample folder holds that generation wrote (PNGs, settings, temporaries)."""
    return [p for p in folder.iterdir()
            if p.is_file() and (PNG_RE.match(p.name) or p.name == SETTINGS_FILE
                                or (p.name.startswith(".") and p.name.endswith(".tmp")))]  # fmt: skip


def _prepare_folder(folder: Path, settings: GenerationSettings, overwrite: bool = False) -> None:
    """Create the folder with settings.json, or check an existing one holds the same settings.

    A folder whose settings.json differs (another checkpoint content, VQ-VAE, NA backend, code
    version, ...) is refused with the differing keys, or emptied first with ``overwrite``."""
    want = settings.to_json()
    path = folder / SETTINGS_FILE
    if dist.is_main():
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"sample folder {folder} exists and is a file, not a directory")
        folder.mkdir(parents=True, exist_ok=True)
        if path.exists():
            try:
                have = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                have = {"<unreadable settings.json>": str(e)}
            diff = sorted(k for k in set(want) | set(have)
                          if k not in INFO_KEYS and want.get(k) != have.get(k))  # fmt: skip
            if diff and overwrite:
                log.warning("%s held samples made with other settings (differs in %s): "
                            "deleting them (--overwrite)", folder, diff)  # fmt: skip
                for f in _sample_files(folder):
                    f.unlink()
            elif diff:
                shown = "; ".join(f"{k}: folder {have.get(k)!r}, now {want.get(k)!r}"
                                  for k in diff[:3])  # fmt: skip
                raise ValueError(
                    f"{folder} already holds samples made with other settings (differs in "
                    f"{diff}: {shown}); pass --overwrite to discard them, or use another --out-dir"
                )
        if not path.exists():
            atomic_write_json(path, want)
        # Leftovers of an interrupted write; safe to remove before any rank starts writing.
        remove_stale_temps(folder)
    dist.barrier()


_PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def png_complete(path: Path) -> bool:
    """Cheap completeness check of a PNG already on disk: non-empty, PNG signature, ends with
    the IEND chunk. Our writes are atomic, so this catches files damaged by something else
    (a copy cut short, a full disk in another tool) without decoding 50k images on resume."""
    try:
        size = path.stat().st_size
        if size < 57:  # signature + IHDR + IEND
            return False
        with path.open("rb") as f:
            head = f.read(8)
            f.seek(size - len(_PNG_TRAILER))
            return head == b"\x89PNG\r\n\x1a\n" and f.read() == _PNG_TRAILER
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def generate_samples(
    sampler: Sampler,
    settings: GenerationSettings,
    out_dir: str | os.PathLike[str],
    *,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Sample every image of ``settings`` into ``out_dir/<settings.folder_name()>``; returns it.

    Runs on all ranks of an initialised process group (each takes b % world == rank), or
    alone. ``max_batches`` stops this process after sampling that many batches (skipped,
    already complete batches do not count) — an interruption on purpose, for tests.
    """
    provenance = getattr(sampler, "provenance", None) or {}
    wrong = {k: (getattr(settings, k), v) for k, v in provenance.items() if getattr(settings, k) != v}
    if wrong:  # the folder would be keyed by weights or a kernel other than those that run
        raise ValueError(f"settings disagree with the sampler's weights/kernel {wrong}; build them "
                         "with GenerationSettings(..., **sampler.provenance)")  # fmt: skip
    folder = Path(out_dir) / settings.folder_name()
    _prepare_folder(folder, settings, overwrite)
    rank, world = dist.get_rank(), dist.get_world_size()
    labels = settings.labels()
    mine = settings.rank_batches(rank, world)
    todo = []
    for b in mine:
        paths = [folder / png_name(i) for i in settings.batch_range(b)]
        damaged = [p for p in paths if p.exists() and not png_complete(p)]
        for p in damaged:  # a 0-byte or cut-short PNG is not "done": sample its batch again
            log.warning("%s is empty or truncated: deleting it and sampling its batch again", p)
            p.unlink()
        if damaged or not all(p.is_file() for p in paths):
            todo.append(b)
    log.info(
        "rank %d/%d: %d of its %d batches to sample into %s (%d images in total)",
        rank, world, len(todo), len(mine), folder, settings.num_images,
    )  # fmt: skip
    if max_batches is not None and len(todo) > max_batches:
        log.info(
            "rank %d: sampling only %d of %d batches (max_batches)", rank, max_batches, len(todo)
        )
        todo = todo[:max_batches]
    from mvar.attention import backends_used, reset_backends_used

    reset_backends_used()
    for b in progress(todo, len(todo), f"sampling (rank {rank})", log, unit="batch",
                      enabled=rank == 0):  # fmt: skip
        idx = settings.batch_range(b)
        label_B = torch.from_numpy(labels[idx.start : idx.stop]).to(device)
        img01 = sampler.sample(label_B, settings.g_seed(b))
        if img01.shape[0] != len(idx) or img01.ndim != 4 or img01.shape[1] != 3:
            raise ValueError(
                f"sampler returned {tuple(img01.shape)} for a batch of {len(idx)}; expected "
                f"({len(idx)}, 3, H, W)"
            )
        for i, img in zip(idx, to_uint8(img01, settings.uint8)):
            # A PNG that exists is complete (resume relies on it): write, then rename.
            with atomic_path(folder / png_name(i)) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
        ran = set(backends_used())
        if ran - {settings.na_backend}:
            raise RuntimeError(
                f"neighbourhood-attention backend(s) {sorted(ran)} ran, but {folder} is keyed "
                f"by na_backend={settings.na_backend!r}; pass the backend explicitly"
            )
    dist.barrier()
    return folder


def list_pngs(folder: str | os.PathLike[str]) -> list[Path]:
    """Sample PNGs of a folder in index order (temporary files ignored)."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(folder).iterdir() if (m := PNG_RE.match(p.name))
    )
    return [p for _, p in found]


def _read_png(p: Path) -> np.ndarray:
    try:
        with Image.open(p) as im:
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{p}: unreadable or truncated image ({e}); delete it and run the "
                         "generation again to resample it") from None  # fmt: skip


#: Free space kept beyond the npz's own size when packing (zip headers, other writers).
NPZ_SPACE_MARGIN = 64 << 20


def pack_npz(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    expected: int | None = None,
) -> Path:
    """Pack ``000000.png`` ... into an ADM-style npz ``arr_0`` uint8 (N, H, W, 3), index order.

    N comes from ``settings.json`` (or ``expected``); every index must be present and every
    image must have the shape of the first. Before writing, the free space of the target's
    file system is checked against the npz size (50k x 256 x 256 x 3 is 9.8 GB). Images are
    streamed one by one into the (uncompressed) zip member, so memory stays at one image and
    no memory-mapped file can fault when the disk fills; the npz is written to a temporary
    name and renamed, and that temporary is removed on any failure. Default ``out``:
    ``<folder>.npz`` beside the folder.
    """
    import shutil
    import zipfile

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sample folder {folder} does not exist")
    if expected is None:
        settings_path = folder / SETTINGS_FILE
        if not settings_path.is_file():
            raise FileNotFoundError(
                f"{settings_path} not found: pass expected=N for a folder not made by mvar.generate"
            )
        expected = int(json.loads(settings_path.read_text())["num_images"])
    files = list_pngs(folder)
    names = {p.name for p in files}
    missing = [png_name(i) for i in range(expected) if png_name(i) not in names]
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} of {expected} images missing (first: {missing[:5]}); "
            "run the generation again to finish it"
        )
    extra = len(files) - expected
    if extra:
        raise ValueError(f"{folder}: {extra} PNGs beyond the expected {expected}")
    out = Path(out) if out is not None else folder.with_name(folder.name + ".npz")
    if out.is_dir():
        raise ValueError(f"npz output {out} is a directory; expected a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name)
    first = _read_png(files[0])
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(
            f"{files[0]}: expected an RGB uint8 image, got {first.dtype} {first.shape}"
        )
    shape = (expected, *first.shape)
    need = int(np.prod(shape, dtype=np.int64)) + NPZ_SPACE_MARGIN
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise OSError(
            f"not enough free space to write {out}: need {need / 1e9:.2f} GB "
            f"({expected} images {first.shape}), {out.parent} has {free / 1e9:.2f} GB free"
        )
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": shape}  # fmt: skip
    try:
        with atomic_path(out) as tmp, zipfile.ZipFile(
            tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True
        ) as zf, zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for p in progress(files, expected, "packing npz", log, unit="img"):
                img = first if p == files[0] else _read_png(p)
                if img.shape != first.shape or img.dtype != np.uint8:
                    raise ValueError(f"{p}: shape {img.shape} {img.dtype} differs from "
                                     f"{files[0].name}'s {first.shape}")  # fmt: skip
                member.write(np.ascontiguousarray(img).tobytes())
    except OSError as e:
        raise OSError(f"writing {out} failed ({e}); the partial file was removed") from e
    log.info("packed %d images %s into %s", expected, first.shape, out)
    return out


# --------------------------------------------------------------------------------------------
# The real models
# --------------------------------------------------------------------------------------------


class ModelSampler:
    """Adapter from a VAR / MVAR (``model.sample(vae, label_B, ...)``) to :class:`Sampler`."""

    def __init__(
        self,
        vae: torch.nn.Module,
        model: torch.nn.Module,
        sampling: SamplingConfig,
        dtype: str = precision.DEFAULT_PRECISION,
        provenance: dict[str, str] | None = None,
    ) -> None:
        self.vae, self.model, self.sampling = vae, model, sampling
        self.dtype = precision.check_precision(dtype)
        # GenerationSettings fields that identify the weights and the kernel (build_sampler)
        self.provenance: dict[str, str] = provenance or {}

    def sample(self, label_B: torch.Tensor, g_seed: int) -> torch.Tensor:
        s = self.sampling
        with torch.inference_mode():
            out = self.model.sample(
                self.vae, label_B, guidance=s.guidance, top_k=s.top_k, top_p=s.top_p, g_seed=g_seed,
                more_smooth=s.more_smooth, dtype=self.dtype,
            )  # fmt: skip
        return out.img01.float()


def code_version() -> str:
    """``<mvar version>+src.<hash>``: the first 12 hex of :func:`mvar.cache.code_fingerprint`
    (the package's Python sources, ``mvar/`` and ``baselines/``), so a sample folder is tied to
    the code that made its pixels, committed or not, while edits elsewhere (docs, reports) do
    not invalidate it. The git SHA is recorded beside it for reading (``settings.json``
    ``git_sha``), not compared."""
    from mvar import __version__
    from mvar.cache import code_fingerprint

    return f"{__version__}+src.{code_fingerprint()[:12]}"


def resolve_na_backend(model: torch.nn.Module, device: torch.device | str, dtype: str) -> str:
    """The neighbourhood-attention backend ``model`` will run (``"none"`` without NA), pinned
    on the model so that what runs is what the sample folder is keyed by. A backend named
    explicitly that cannot run here is an error; ``None`` picks one (a fallback is logged as
    a WARNING by ``mvar.attention.default_backend``)."""
    from mvar.attention import BackendUnavailableError, backend_unavailable_reason, default_backend

    na = getattr(model, "neighbourhood_attention", None)
    cfg = getattr(model, "config", None)
    if na is None or not getattr(cfg, "spatial_markov", False):
        return "none"
    dev = torch.device(device)
    if na.backend is not None:
        reason = backend_unavailable_reason(na.backend, dev, precision.torch_dtype(dtype))
        if reason is not None:
            raise BackendUnavailableError(
                f"neighbourhood-attention backend {na.backend!r} cannot run here: {reason}"
            )
        return str(na.backend)
    na.backend = default_backend(dev, precision.torch_dtype(dtype))
    return str(na.backend)


def build_sampler(
    model: str,
    ckpt: str | os.PathLike[str] | None,
    vae_ckpt: str | os.PathLike[str] | None,
    sampling: SamplingConfig,
    device: torch.device | str = "cpu",
    dtype: str = precision.DEFAULT_PRECISION,
    na_backend: str | None = None,
) -> ModelSampler:
    """Load (or random-initialise with seed 0, without ``ckpt``) a model and wrap it as a
    Sampler. The init seed is fixed, not the sampling seed, so that "random-init" in a folder
    name always means the same weights.

    A missing checkpoint file raises FileNotFoundError naming it, where it was looked for and
    where to download it (``mvar.checkpoint.resolve_checkpoint``).
    """
    from mvar.checkpoint import load_pretrained, resolve_checkpoint
    from mvar.metrics import sha256_file

    # Resolve both files before building anything, so a typo fails in a second.
    dtype = precision.check_precision(dtype, device)  # fp16 on a CPU: one line, nothing built
    ckpt = resolve_checkpoint(ckpt) if ckpt is not None else None
    vae_ckpt = resolve_checkpoint(vae_ckpt) if vae_ckpt is not None else None
    vae, net = load_pretrained(model, ckpt, vae_ckpt, device=device, seed=0, na_backend=na_backend)
    provenance = {
        "checkpoint": ckpt.stem if ckpt is not None else "random-init",
        "checkpoint_sha256": sha256_file(ckpt) if ckpt is not None else "",
        "vae_checkpoint": vae_ckpt.stem if vae_ckpt is not None else "random-init",
        "vae_sha256": sha256_file(vae_ckpt) if vae_ckpt is not None else "",
        "na_backend": resolve_na_backend(net, device, dtype),
        "device": torch.device(device).type,
    }
    return ModelSampler(vae.eval(), net.eval(), sampling, dtype, provenance)


def _parse_classes(text: str | None, num_classes: int) -> tuple[int, ...]:
    if not text:
        return tuple(range(num_classes))
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from mvar.attention import BACKENDS

    p = argparse.ArgumentParser(prog="mvar generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model preset or released checkpoint name")
    p.add_argument("--ckpt", help="transformer checkpoint (omit: random init, for trying out)")
    p.add_argument("--vae-ckpt", help="VQ-VAE checkpoint (omit: random init)")
    p.add_argument("--out-dir", default="outputs/samples", help="parent of the sample folder")
    p.add_argument("--overwrite", action="store_true",
                   help="discard samples in the folder made with other settings (default: refuse)")  # fmt: skip
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float,
                   help="classifier-free guidance scale >= 0 (--cfg is the official code's name; "
                        "default: the checkpoint's official setting)")
    p.add_argument("--top-k", type=int, help="integer >= 0, 0 = off; above the vocabulary it is "
                   "clamped to the vocabulary size (keeps every token)")  # fmt: skip
    p.add_argument("--top-p", type=float, help="in [0, 1], 0 = off")
    p.add_argument("--more-smooth", action="store_true", help="pictures only, never for FID")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-mode", choices=("per-batch", "fixed"), default="per-batch")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--num-classes", type=int,
                   help="sample classes 0..N-1 (default: every class of the model)")
    p.add_argument("--classes", help="comma-separated class ids (default: 0..num_classes-1)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--uint8", choices=("round", "truncate"), default="round")
    p.add_argument("--dtype", choices=precision.PRECISIONS, default=precision.DEFAULT_PRECISION,
                   help="fp32: no autocast (parity); bf16: autocast (CPU, GPU); fp16: autocast, "
                   "GPU only (the official samplers' setting); recorded in the folder's key")  # fmt: skip
    p.add_argument("--na-backend", choices=sorted(BACKENDS),
                   help="neighbourhood-attention backend (MVAR; default: the fastest that runs)")  # fmt: skip
    p.add_argument("--device", help="default: this rank's GPU, else cpu")
    p.add_argument("--max-batches", type=int, help="stop after this many batches per process")
    p.add_argument(
        "--npz", nargs="?", const="", help="pack an npz when done (default: <folder>.npz)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    from mvar.cli import setup_logging
    from mvar.config import get_preset

    args = build_parser().parse_args(argv)
    setup_logging()
    # Every input checked before a model is built or a file written.
    mcfg = get_preset(CHECKPOINT_PRESETS.get(args.model, args.model))
    sampling = sampling_for(args.model, args.guidance, args.top_k, args.top_p, args.more_smooth)
    check_sampling_settings(sampling.guidance, sampling.top_k, sampling.top_p)
    classes = _parse_classes(args.classes, args.num_classes or mcfg.num_classes)
    check_class_labels(list(classes), mcfg.num_classes)
    if args.per_class < 1 or args.batch_size < 1:
        raise ValueError(f"--per-class and --batch-size must be >= 1, got {args.per_class} and "
                         f"{args.batch_size}")  # fmt: skip
    if args.max_batches is not None and args.max_batches < 0:
        raise ValueError(f"--max-batches must be >= 0, got {args.max_batches}")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file; expected a directory")
    if args.npz and Path(args.npz).is_dir():
        raise ValueError(f"--npz {args.npz} is a directory; expected a file path")
    dist.init_from_env()
    try:
        device = torch.device(args.device) if args.device else dist.default_device()
        if args.model not in CHECKPOINT_PRESETS and args.ckpt:
            releases = [n for n, r in RELEASES.items() if r.preset == args.model]
            log.info("%s is an architecture, not a released checkpoint name: sampling %s%s",
                     args.model, sampling, f" (the official settings of its releases: --model "
                     f"{' or '.join(releases)})" if releases else "")  # fmt: skip
        sampler = build_sampler(args.model, args.ckpt, args.vae_ckpt, sampling, device,
                                args.dtype, args.na_backend)  # fmt: skip
        settings = GenerationSettings(
            model=args.model,
            guidance=sampling.guidance,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            more_smooth=sampling.more_smooth,
            seed=args.seed,
            seed_mode=args.seed_mode,
            per_class=args.per_class,
            classes=classes,
            batch_size=args.batch_size,
            uint8=args.uint8,
            dtype=args.dtype,
            code_version=code_version(),
            **sampler.provenance,  # type: ignore[arg-type]
        )
        folder = generate_samples(sampler, settings, out_dir, max_batches=args.max_batches,
                                  device=device, overwrite=args.overwrite)  # fmt: skip
        if args.npz is not None and dist.is_main():
            if all(png_complete(folder / png_name(i)) for i in range(settings.num_images)):
                pack_npz(folder, args.npz or None, expected=settings.num_images)
            else:
                log.warning("not packing: %s is incomplete (run again to resume)", folder)
        dist.barrier()
        return folder
    finally:
        dist.destroy()


if __name__ == "__main__":
    from mvar.cli import run_command

    run_command(main, "generate")
