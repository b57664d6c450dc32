"""A domain evaluator for the embedded study: a small CNN classifier trained on the generated
shapes, used in place of Inception-v3 where Inception's ImageNet features mean nothing.

Its penultimate features (after global pooling and one linear layer with ReLU, like Inception's
pool_3) are the space in which FID and precision/recall are computed; its class logits feed the
Inception Score's softmax, and its arg-max gives the class accuracy of generated samples (is an
image classified as the class it was conditioned on?). The metric code is the same as at paper
scale (:mod:`mvar.metrics`): only the feature extractor changes. The extractor is also registered
with torch-fidelity under :data:`EXTRACTOR_NAME`, so ``torch_fidelity.calculate_metrics(...,
feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=...)`` runs on it as well.

Input convention (torch-fidelity's): uint8 images (B, 3, H, W). The classifier is trained on
the uint8-quantised images, exactly what it sees when it scores PNG samples.

Weights files hold ``{"config": {...}, "state_dict": {...}}`` and are read with
``torch.load(weights_only=True)``: no code runs from a file handed to us.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mvar.io import atomic_torch_save, safe_torch_load

log = logging.getLogger(__name__)

EXTRACTOR_NAME = "mvar-shapes-classifier"
FEATURES = "features"  # penultimate features: FID, precision/recall
LOGITS = "logits"  # class logits: IS, class accuracy


@dataclass(frozen=True)
class EvaluatorConfig:
    """The classifier and its training recipe (AdamW, cosine decay, no augmentation: the data
    set is generated, so more of it is the augmentation)."""

    num_classes: int = 10
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64, 128)  # one stage per width, each halving the resolution
    feature_dim: int = 128
    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_classes", "image_size", "feature_dim", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvaluatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"EvaluatorConfig.widths must be positive, got {self.widths}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"EvaluatorConfig.lr must be a positive number, got {self.lr}")


class ShapesClassifier(nn.Module):
    """conv stages (3x3 conv, BN, ReLU, 3x3 stride-2 conv, BN, ReLU) -> global mean ->
    linear+ReLU (the features) -> linear (the logits). Used in eval mode (BN running stats)."""

    def __init__(self, cfg: EvaluatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        cin = 3
        for w in cfg.widths:
            # BatchNorm: the plain conv stack learns the shapes several times slower.
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU()]  # fmt: skip
            cin = w
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(cin, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    @staticmethod
    def normalise(img_B3HW_uint8: Tensor) -> Tensor:
        return img_B3HW_uint8.float().div(127.5).sub(1.0)

    def features_and_logits(self, img_B3HW_uint8: Tensor) -> tuple[Tensor, Tensor]:
        if img_B3HW_uint8.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {img_B3HW_uint8.dtype}")
        size = self.cfg.image_size
        if img_B3HW_uint8.dim() != 4 or tuple(img_B3HW_uint8.shape[1:]) != (3, size, size):
            raise ValueError(
                f"the evaluator takes (B, 3, {size}, {size}) images, got "
                f"{tuple(img_B3HW_uint8.shape)}"
            )
        h = self.trunk(self.normalise(img_B3HW_uint8)).mean(dim=(2, 3))
        feat = F.relu(self.embed(h))
        return feat, self.head(feat)

    def forward(self, img_B3HW_uint8: Tensor) -> Tensor:
        return self.features_and_logits(img_B3HW_uint8)[1]


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------


def save_evaluator(model: ShapesClassifier, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``{"config", "state_dict"}`` (tensors and plain values only)."""
    cfg = dataclasses.asdict(model.cfg)
    cfg["widths"] = list(cfg["widths"])
    return atomic_torch_save({"config": cfg, "state_dict": model.state_dict()}, path)


def load_evaluator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ShapesClassifier:
    """The classifier stored at ``path``; one clear error for a missing or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"evaluator weights {p} not found; train them with the embedded study "
            "(python -m repro.embedded), which writes <cache>/evaluator-*/evaluator.pth"
        )
    obj = safe_torch_load(p, "evaluator weights")
    if not (isinstance(obj, dict) and {"config", "state_dict"} <= obj.keys()):
        raise ValueError(f"{p} is not an evaluator weights file (expected keys config, state_dict)")
    c = dict(obj["config"])
    c["widths"] = tuple(c["widths"])
    model = ShapesClassifier(EvaluatorConfig(**c))
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def to_uint8_B3HW(img_B3HW_pm1: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 (B, 3, H, W), exactly as samples are written to PNG
    (:func:`mvar.generate.to_uint8`, round mode)."""
    from mvar.generate import to_uint8

    return torch.from_numpy(to_uint8(img_B3HW_pm1.add(1).mul(0.5), "round")).permute(0, 3, 1, 2)


def dataset_uint8(data: Dataset, batch: int = 256) -> tuple[Tensor, Tensor]:
    """All images of ``data`` as uint8 (N, 3, H, W) and their labels (N,)."""
    n = len(data)  # type: ignore[arg-type]
    imgs, labels = [], []
    for s in range(0, n, batch):
        items = [data[i] for i in range(s, min(n, s + batch))]
        imgs.append(to_uint8_B3HW(torch.stack([x for x, _ in items])))
        labels.append(torch.tensor([int(y) for _, y in items]))
    return torch.cat(imgs), torch.cat(labels)


def train_evaluator(
    cfg: EvaluatorConfig, images_uint8: Tensor, labels: Tensor, log_every: int = 50
) -> ShapesClassifier:
    """Train the classifier on uint8 images (N, 3, H, W); deterministic for a given seed.

    The batch of step g is drawn from a generator seeded by (seed, g) like the transformer
    trainer's, so the run does not depend on how many steps ran before in the process."""
    if images_uint8.shape[0] != labels.shape[0] or images_uint8.shape[0] < 2:
        raise ValueError(
            f"need matching images and labels (>= 2), got {tuple(images_uint8.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if int(labels.max()) >= cfg.num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels must lie in 0..{cfg.num_classes - 1}")
    torch.manual_seed(cfg.seed)
    model = ShapesClassifier(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(images_uint8.shape[0], (cfg.batch_size,), generator=g)
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(images_uint8[rows]), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            log.info("evaluator step %d/%d loss %.4f lr %.2e (%.1f s)",
                     step + 1, cfg.steps, loss.item(), lr, time.perf_counter() - t0)  # fmt: skip
    return model.eval()


@torch.no_grad()
def accuracy(model: ShapesClassifier, images_uint8: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Fraction of images whose arg-max class equals the label."""
    correct = 0
    for s in range(0, images_uint8.shape[0], batch):
        correct += int((model(images_uint8[s : s + batch]).argmax(1) == labels[s : s + batch]).sum())
    return correct / images_uint8.shape[0]


# --------------------------------------------------------------------------------------------
# Feature extraction (and the torch-fidelity registration)
# --------------------------------------------------------------------------------------------


@dataclass
class EvalFeatures:
    """Per-image evaluator outputs: ``features`` (N, d) float64 for FID / precision-recall and
    ``logits`` (N, classes) float64 for IS and class accuracy."""

    features: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@torch.no_grad()
def extract(
    model: ShapesClassifier, batches: Iterable[np.ndarray | Tensor], what: str = "images"
) -> EvalFeatures:
    """Features and logits of a stream of uint8 batches, (B, H, W, 3) numpy (as read from PNG
    or npz) or (B, 3, H, W) tensors; logs progress every few thousand images."""
    feats, logits, n, next_log = [], [], 0, 5000
    for b in batches:
        x = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2) if isinstance(b, np.ndarray) else b
        f, lg = model.features_and_logits(x)
        feats.append(f.double().numpy())
        logits.append(lg.double().numpy())
        n += x.shape[0]
        if n >= next_log:
            log.info("evaluator features: %d %s", n, what)
            next_log += 5000
    if not feats:
        raise ValueError(f"no {what} to extract evaluator features from")
    return EvalFeatures(np.concatenate(feats), np.concatenate(logits))


def _fidelity_extractor_cls() -> type:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ShapesFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper of the classifier: uint8 (B, 3, H, W) -> (features, logits)."""

        def __init__(self, name: str, features_list: Sequence[str],
                     feature_extractor_weights_path: str | None = None, **_: object) -> None:  # fmt: skip
            super().__init__(name, list(features_list))
            if feature_extractor_weights_path is None:
                raise ValueError(f"{EXTRACTOR_NAME} needs feature_extractor_weights_path")
            self.model = load_evaluator(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return (FEATURES, LOGITS)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": LOGITS, "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            f, lg = self.model.features_and_logits(x)
            out = {FEATURES: f, LOGITS: lg}
            return tuple(out[name] for name in self.features_list)

    return ShapesFeatureExtractor


def register_with_torch_fidelity() -> str:
    """Register the classifier as torch-fidelity feature extractor :data:`EXTRACTOR_NAME`
    (once per process); returns the name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, _fidelity_extractor_cls())
    return EXTRACTOR_NAME
