"""Inception-v3 features for FID / IS / precision-recall, on torch-fidelity's TF-compatible net.

We use torch-fidelity's ``inception-v3-compat`` extractor (``FeatureExtractorInceptionV3``),
which reproduces the TF ``classify_image_graph_def.pb`` the ADM evaluator runs (docs/evaluation.md §3.1),
and never let it download anything: the weights file comes from, in this order,

1. the ``weights_path`` argument (``--inception-weights`` on the command lines),
2. the environment variable ``MVAR_INCEPTION_WEIGHTS``,
3. ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (where
   torch-fidelity itself would cache it).

A missing file raises an error naming the file, every place looked and the download URL.

Checksum: torch.hub names files ``<name>-<first 8 hex of sha256>.<ext>``, so the official
file's sha256 must start with ``6726825d``. That prefix is all we can know offline; the full
sha256 of whatever file was used is recorded with every result, and a prefix mismatch warns
(or raises with ``strict_hash=True``).

Features per image (uint8, any size; the net resizes to 299 the TF way):
``pool`` = 2048-d pool_3 (FID, precision/recall), ``logits`` = 1008-way pool_3 x W without the
bias (``logits_unbiased``; what the ADM evaluator's softmax sees) for IS.

``spatial`` = the ADM evaluator's sFID feature, ``mixed_6/conv:0[..., :7]`` flattened in NHWC
order (2023-d). Which module of torch-fidelity's network produces that tensor is established
in docs/evaluation.md §3.5 (``Mixed_6d.branch1x1``; after its ReLU, which is inferred from the
TF graph's naming, not checked numerically: :data:`SFID_FEATURE`); :class:`SfidCapture` reads it
with a forward hook during the same forward that yields ``pool`` and ``logits``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from mvar.io import atomic_path, atomic_torch_save, progress, safe_torch_load
from mvar.metrics import sha256_file

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

WEIGHTS_ENV = "MVAR_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# The URL torch-fidelity 0.4.0 downloads from (feature_extractor_inceptionv3.URL_INCEPTION_V3).
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
# torch.hub's file-naming convention: the suffix is the sha256's first 8 hex digits.
OFFICIAL_SHA256_PREFIX = "6726825d"

EXTRACTOR_NAME = "inception-v3-compat"
RANDOM_EXTRACTOR_LABEL = "random-init inception (NOT comparable to paper)"
POOL_FEATURE = "2048"
LOGITS_FEATURE = "logits_unbiased"
POOL_DIM, NUM_LOGITS = 2048, 1008

# sFID (docs/evaluation.md §3.5): the ADM evaluator takes ``mixed_6/conv:0`` of the 2015 TF graph,
# a (N, 17, 17, 192) NHWC tensor, keeps channels [:7] and flattens. torch-fidelity's own weight
# converter maps that TF layer's conv and batchnorm onto ``Mixed_6d.branch1x1`` (TF numbering:
# mixed..mixed_2 = Mixed_5b..5d, mixed_3 = Mixed_6a, mixed_4..mixed_7 = Mixed_6b..6e); the
# tensor named by the layer itself is the activation after its ReLU, which is what the
# BasicConv2d module returns.
SFID_MODULE = "Mixed_6d.branch1x1"
SFID_CHANNELS = 7
SFID_GRID = 17
SFID_DIM = SFID_GRID * SFID_GRID * SFID_CHANNELS  # 2023

# Provenance carried by every sFID result: the mapping above, whose post-ReLU half is inferred
# from the graph's naming (docs/evaluation.md §3.5) and not checked against TensorFlow.
SFID_FEATURE = (
    f"{SFID_MODULE} post-ReLU (inferred mapping of mixed_6/conv, docs/evaluation.md §3.5), "
    f"NHWC[..., :{SFID_CHANNELS}] flattened ({SFID_DIM}-d)"
)


def sfid_flatten(module_out_BCHW: torch.Tensor) -> torch.Tensor:
    """The ADM evaluator's sFID feature from the module output: NCHW -> NHWC (TensorFlow's
    order), channels [:7], flattened to (N, 17·17·7 = 2023)."""
    if module_out_BCHW.dim() != 4 or tuple(module_out_BCHW.shape[2:]) != (SFID_GRID, SFID_GRID):
        raise ValueError(
            f"sFID expects a (N, C, {SFID_GRID}, {SFID_GRID}) map from {SFID_MODULE}, got "
            f"{tuple(module_out_BCHW.shape)}"
        )
    x_BHWC = module_out_BCHW.permute(0, 2, 3, 1)[..., :SFID_CHANNELS]
    return x_BHWC.reshape(x_BHWC.shape[0], -1)


class SfidCapture:
    """Capture the sFID feature of every forward of ``net`` (torch-fidelity's Inception) with a
    forward hook on :data:`SFID_MODULE`; ``batches`` holds one (B, 2023) float64 array per
    forward.

    Usage::

        with SfidCapture(net) as cap:
            net(x_B3HW)
        spatial = np.concatenate(cap.batches)
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.module = net.get_submodule(SFID_MODULE)
        self.batches: list[np.ndarray] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, _m: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
        self.batches.append(sfid_flatten(out.detach()).double().cpu().numpy())

    def __enter__(self) -> Self:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# --------------------------------------------------------------------------------------------
# Locating and checking the weights
# --------------------------------------------------------------------------------------------


def _torch_fidelity_extractor_cls() -> type:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:  # pragma: no cover - the eval extra is a declared dependency
        raise ImportError(
            f"torch-fidelity is needed for Inception features ({e}); install it with "
            "`pip install -e .[eval]`"
        ) from e
    return FeatureExtractorInceptionV3


def candidate_weight_paths(
    weights_path: str | os.PathLike[str] | None = None,
) -> list[tuple[Path, str]]:
    """Where we look for the weights, in order, each with how it was chosen."""
    if weights_path is not None:
        return [(Path(weights_path), "--inception-weights")]
    out = []
    if os.environ.get(WEIGHTS_ENV):
        out.append((Path(os.environ[WEIGHTS_ENV]), f"${WEIGHTS_ENV}"))
    out.append((Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME, "torch hub cache"))
    return out


def resolve_weights(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to use; raises FileNotFoundError naming every place looked."""
    candidates = candidate_weight_paths(weights_path)
    for path, _ in candidates:
        if path.is_file():
            return path
    looked = "; ".join(f"{p} ({how})" for p, how in candidates)
    raise FileNotFoundError(
        f"Inception weights {WEIGHTS_FILENAME} not found (looked in: {looked}). Nothing is "
        f"downloaded at run time: download it from {WEIGHTS_URL} and pass "
        f"--inception-weights PATH or set ${WEIGHTS_ENV}"
    )


@dataclass(frozen=True)
class WeightsInfo:
    path: str
    sha256: str
    official: bool  # sha256 starts with the official file's prefix
    label: str  # what results call this extractor

    def as_dict(self) -> dict[str, object]:
        return {
            "inception_weights": self.path,
            "inception_weights_sha256": self.sha256,
            "inception_weights_official_prefix": OFFICIAL_SHA256_PREFIX,
            "inception_weights_match_official_prefix": self.official,
            "extractor": self.label,
        }


def verify_weights(
    path: str | os.PathLike[str], strict_hash: bool = False, label: str | None = None
) -> WeightsInfo:
    """sha256 of the weights and whether it matches the official file's known prefix."""
    digest = sha256_file(path)
    official = digest.startswith(OFFICIAL_SHA256_PREFIX)
    if not official:
        msg = (
            f"Inception weights {path} have sha256 {digest}, which does not start with "
            f"{OFFICIAL_SHA256_PREFIX} (the official {WEIGHTS_FILENAME} from {WEIGHTS_URL}); "
            "scores will not be comparable to published ones"
        )
        if strict_hash:
            raise ValueError(msg + " (strict hash check requested)")
        if label != RANDOM_EXTRACTOR_LABEL:  # random test weights are expected to differ
            warnings.warn(msg, stacklevel=2)
    if label is None:
        label = (
            EXTRACTOR_NAME if official else f"{EXTRACTOR_NAME} (unverified weights {digest[:12]})"
        )
    return WeightsInfo(path=str(path), sha256=digest, official=official, label=label)


# --------------------------------------------------------------------------------------------
# Random, variance-preserving weights (tests and the embedded demo)
# --------------------------------------------------------------------------------------------


def _inception_skeleton(features: tuple[str, ...] = (POOL_FEATURE,)) -> torch.nn.Module:
    """torch-fidelity's Inception module with its default (unloaded) parameters.

    The class always ``torch.load``s a path in ``__init__`` with ``weights_only=False``, which
    would run code hidden in a hostile weights file; so it never sees the user's file: we hand
    it an empty dict we wrote ourselves and skip its load in a subclass. Real weights are
    loaded afterwards from tensors read with ``weights_only=True`` (:func:`build_extractor`)."""
    base = _torch_fidelity_extractor_cls()

    class _Skeleton(base):  # type: ignore[misc, valid-type]
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            if state_dict:
                raise RuntimeError("skeleton must not load weights")

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        return _Skeleton(EXTRACTOR_NAME, list(features), feature_extractor_weights_path=str(empty))


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The Inception state dict of ``path``, read with ``weights_only=True`` (never unpickles
    code; ``mvar.io.safe_torch_load``). Raises ValueError naming the file otherwise."""
    sd = safe_torch_load(path, "Inception weights")
    if not isinstance(sd, dict) or not sd or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ValueError(
            f"Inception weights {path} are not a state dict (name -> tensor); expected "
            f"{WEIGHTS_FILENAME} ({WEIGHTS_URL})"
        )
    return sd


def build_extractor(
    state_dict: dict[str, torch.Tensor], source: str, features: tuple[str, ...]
) -> torch.nn.Module:
    """torch-fidelity's network with ``state_dict`` loaded strictly (every key, every shape)."""
    net = _inception_skeleton(features)
    try:
        torch.nn.Module.load_state_dict(net, state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise ValueError(
            f"Inception weights {source} do not fit torch-fidelity's {EXTRACTOR_NAME} network: "
            + " ".join(ln.strip() for ln in first[:3])[:400]
        ) from None
    for k, v in state_dict.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            log.warning("Inception weights %s: tensor %s holds NaN or inf", source, k)
            break
    return net.eval()


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the Inception extractor's keys and shapes, random but
    variance-preserving, so that features of different images differ (PyTorch's default init
    makes every feature collapse and every metric read zero — docs/evaluation.md §6).

    conv weights ~ N(0, 2 / fan_in) (He: every conv is followed by BN then ReLU, which halves
    the second moment); BN is the identity (mean 0, var 1, gamma 1, beta 0); the classifier
    ~ N(0, 1 / 2048) with zero bias, so logits have O(1) spread.
    """
    g = torch.Generator().manual_seed(seed)
    sd = _inception_skeleton().state_dict()
    out: dict[str, torch.Tensor] = {}
    for key in sorted(sd):
        t = sd[key]
        if key.endswith(("num_batches_tracked", "running_mean", "bn.bias")) or key == "fc.bias":
            v = torch.zeros_like(t)
        elif key.endswith(("running_var", "bn.weight")):
            v = torch.ones_like(t)
        elif key.endswith("conv.weight"):
            fan_in = t[0].numel()
            v = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key == "fc.weight":
            v = torch.randn(t.shape, generator=g) * (1.0 / t.shape[1]) ** 0.5
        else:  # a key we do not know means torch-fidelity changed; fail loudly
            raise KeyError(f"unexpected Inception state-dict key {key!r}")
        out[key] = v.to(t.dtype).contiguous()
    return out


def save_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write :func:`random_inception_state_dict` to ``path`` (atomically); returns the path."""
    return atomic_torch_save(random_inception_state_dict(seed), path)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


class FeatureCacheError(ValueError):
    """A stored feature file lacks an array this code needs (e.g. written before sFID)."""


@dataclass
class Features:
    """Everything one Inception forward gives per image (float64 rows, one per image)."""

    pool: np.ndarray  # (N, 2048) pool_3: FID, precision/recall
    logits: np.ndarray  # (N, 1008) pool_3 x W without the bias: IS
    spatial: np.ndarray  # (N, 2023) mixed_6/conv[..., :7] in NHWC order: sFID

    KEYS: ClassVar[tuple[str, ...]] = ("pool", "logits", "spatial")

    def __len__(self) -> int:
        return self.pool.shape[0]

    @classmethod
    def concatenate(cls, parts: list[Features]) -> Features:
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in cls.KEYS))

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, pool=self.pool, logits=self.logits, spatial=self.spatial)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Features:
        """Read a file written by :meth:`save`; one lacking an array (a cache written before
        sFID was computed) raises :class:`FeatureCacheError` instead of being half-used."""
        with np.load(path) as z:
            missing = [k for k in cls.KEYS if k not in z.files]
            if missing:
                raise FeatureCacheError(
                    f"feature file {path} lacks {missing} (it has {sorted(z.files)}); it was "
                    "written by an older version"
                )
            feats = cls(*(z[k] for k in cls.KEYS))
        rows = {k: getattr(feats, k).shape for k in cls.KEYS}
        if len({s[0] for s in rows.values()}) != 1 or feats.spatial.shape[1:] != (SFID_DIM,):
            raise FeatureCacheError(f"feature file {path} has inconsistent shapes {rows}")
        return feats


class InceptionExtractor:
    """pool_3 features, unbiased logits and sFID features of uint8 images through
    torch-fidelity's net."""

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        strict_hash: bool = False,
        label: str | None = None,
    ) -> None:
        path = resolve_weights(weights_path)
        self.info = verify_weights(path, strict_hash=strict_hash, label=label)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._path = path
        self._net: torch.nn.Module | None = None  # built on first use: cache hits skip it

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            # Same loading path for real and random weights; torch-fidelity never opens the file.
            sd = load_weights_file(self._path)
            self._net = build_extractor(
                sd, str(self._path), (POOL_FEATURE, LOGITS_FEATURE)
            ).to(self.device)
            log.info(
                "Inception extractor %s from %s (sha256 %s)",
                self.info.label, self._path, self.info.sha256,
            )  # fmt: skip
        return self._net

    @torch.no_grad()
    def extract_batch(self, images_BHWC: np.ndarray) -> Features:
        """pool (B, 2048), logits (B, 1008) and the sFID feature (B, 2023), float64, of uint8
        images (B, H, W, 3) -- all three from one forward (the sFID one through a hook)."""
        x = np.asarray(images_BHWC)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {x.dtype} {x.shape}")
        # np.array copies: npz batches are read-only views, which torch.from_numpy warns about.
        x_B3HW = torch.from_numpy(np.array(x, copy=True)).permute(0, 3, 1, 2).to(self.device)
        with SfidCapture(self.net) as cap:
            pool, logits = self.net(x_B3HW)
        (spatial,) = cap.batches  # exactly one forward of the hooked module
        return Features(
            pool=pool.double().cpu().numpy(), logits=logits.double().cpu().numpy(), spatial=spatial
        )

    def extract(
        self, batches: Iterable[np.ndarray], total: int | None = None, desc: str = "inception"
    ) -> Features:
        """Features of a stream of uint8 image batches, re-batched to exactly ``batch_size``
        images per forward (so results do not depend on how the input was chunked)."""
        parts: list[Features] = []
        buf = np.empty((0,), dtype=np.uint8)
        # progress() logs every minute as well as drawing a bar: batch jobs have no terminal.
        for batch in progress(batches, total, desc, log, unit="img", weight=len):
            buf = np.concatenate([buf, batch]) if len(buf) else np.asarray(batch)
            while len(buf) >= self.batch_size:
                parts.append(self.extract_batch(buf[: self.batch_size]))
                buf = buf[self.batch_size :]
        if len(buf):
            parts.append(self.extract_batch(buf))
        if not parts:
            raise ValueError("no images to extract features from")
        return Features.concatenate(parts)
