"""The embedded study: the paper's VAR-vs-MVAR comparison (Tables 1 and 2, and the ablation) at
toy scale on a 2-core CPU, on data the project generates itself -- what a laptop can say about
MVAR's claims, measured end to end.

    python -m repro.embedded                      # the default study (<= 10 minutes, 2 cores)
    python -m repro.embedded --study long         # more steps and samples, same code and files

Pipeline (every stage cached by content, :mod:`mvar.cache`):

1. **Data.** :class:`mvar.data.SyntheticShapes` with striped textures, 32 px, 10 classes
   (5 shapes x 2 colours); disjoint index ranges for tokenizer training, transformer training,
   evaluator training, evaluator test, the reference set and a held-out set.
2. **Tokenizer.** The multi-scale residual VQ-VAE of the tiny presets (pyramid 1..16, as in
   the paper, so MVAR's neighbourhood attention runs on 13x13 and 16x16), trained with
   :mod:`mvar.train_vae`; reconstruction PSNR and codebook usage per scale reported.
3. **Evaluator.** A small classifier (:mod:`mvar.evaluator`); held-out accuracy must reach 98 %.
   Its features replace Inception's for FID / precision / recall, its logits for IS.
4. **Models, one recipe and one budget for all** (same iterations, batch, learning rate,
   schedule shape and seed): ``var-tiny`` from scratch; ``mvar-tiny`` from scratch with the
   official chunk schedule; ``mvar-tiny-finetune`` (MVAR-dagger) fine-tuned from the
   ``var-tiny`` weights; ``mvar-tiny-scale-markov`` (the ablation's scale-Markov-only model).
5. **Samples.** One stated sampling setting for every model, ``per_class`` images per class,
   through the same generation code as at paper scale (:mod:`mvar.generate`, PNG folders).
6. **Metrics.** FID with a bootstrap 95 % interval, IS, precision / recall (k = 3), class
   accuracy of samples; sanity rows: real vs real (the floor), tokenizer reconstructions (the
   ceiling of any AR model on this tokenizer), a blurred and noised set (degraded).
7. **Compute at toy scale, measured on this CPU:** token-generation peak memory, KV cache,
   sampling latency, training-step time (each model under its own schedule) and peak memory,
   attention GFLOPs counted on the toy geometry.

Outputs (the report contract): ``reports/embedded/table1.csv`` (table ``table1-embedded``),
``reports/embedded/table2.csv`` (table ``table2-embedded``), ``reports/embedded/features/*.npy``
(the evaluator features every FID was computed from, ``reference.npy`` included), figures and
``reports/embedded/README.md`` (:mod:`repro.embedded_report`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from mvar import evaluator as ev
from mvar.cache import Artifact, ArtifactCache, code_fingerprint
from mvar.checkpoint import load_transformer
from mvar.config import SamplingConfig, get_preset
from mvar.data import SyntheticShapes, TokenCache, encode_dataset
from mvar.io import atomic_path
from mvar.metrics import (
    bootstrap_fid,
    feature_statistics,
    inception_score,
    precision_recall,
    sha256_file,
)
from mvar.precision import PRECISIONS

log = logging.getLogger(__name__)

TABLE1 = "table1-embedded"
TABLE2 = "table2-embedded"
# Report contract: the four models and the three sanity rows, in this order.
MODELS: dict[str, str] = {  # report name -> preset
    "var-tiny": "var-tiny",
    "mvar-tiny": "mvar-tiny",
    "mvar-tiny-finetune": "mvar-tiny",
    "mvar-tiny-scale-markov": "mvar-tiny-scale-markov",
}
SANITY: tuple[str, ...] = ("real-holdout", "vqvae-reconstruction", "degraded")
SPLITS: tuple[str, ...] = (
    "tokenizer", "transformer", "evaluator", "evaluator_test", "reference", "holdout",
)  # fmt: skip


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides the study's numbers. Presets in :data:`STUDIES`."""

    name: str
    # Data: images per split (multiples of num_classes, so every split is class-balanced).
    num_classes: int = 10
    texture: bool = True
    radius: tuple[float, float] = (0.4, 0.7)
    data_seed: int = 0
    split_sizes: tuple[tuple[str, int], ...] = (
        ("tokenizer", 4000), ("transformer", 3200), ("evaluator", 4000),
        ("evaluator_test", 1000), ("reference", 2000), ("holdout", 1000),
    )  # fmt: skip
    # Tokenizer training (overrides of mvar.train_vae's defaults).
    vae: tuple[tuple[str, Any], ...] = (("steps", 500),)
    # Evaluator.
    evaluator: ev.EvaluatorConfig = field(default_factory=ev.EvaluatorConfig)
    # Transformers: one recipe for all four models.
    steps: int = 200  # x batch 16 = 3200 sequences: one pass over the transformer split
    finetune_steps: int = 80
    batch_size: int = 16
    lr: float = 3e-3  # toy widths need far more than the paper's 1e-4 * batch / 256
    warmup_steps: int = 10
    # Sampling: one setting for every model.
    guidance: float = 1.5
    top_k: int = 0
    top_p: float = 0.96
    per_class: int = 100
    sample_batch: int = 250
    seed: int = 0
    # Sampling precision (mvar.precision): fp32 = no autocast, the parity path; bf16 = autocast
    # for token generation and decode (the FID-within-interval check of issue 13). Training is
    # fp32 either way, so only the samples, their metrics and the compute rows change.
    dtype: str = "fp32"
    # Statistics and compute measurements.
    bootstrap_reps: int = 200
    pr_k: int = 3
    is_splits: int = 10
    latency_batch: int = 16
    latency_repeats: int = 2

    def __post_init__(self) -> None:
        from mvar.precision import check_precision

        object.__setattr__(self, "dtype", check_precision(self.dtype))  # aliases -> short name
        sizes = dict(self.split_sizes)
        if set(sizes) != set(SPLITS):
            raise ValueError(f"split_sizes must name exactly {SPLITS}, got {sorted(sizes)}")
        for name, n in sizes.items():
            if n < self.num_classes or n % self.num_classes:
                raise ValueError(f"split {name!r}: {n} images is not a positive multiple of "
                                 f"{self.num_classes} classes")  # fmt: skip
        for name in ("steps", "finetune_steps", "batch_size", "per_class", "sample_batch",
                     "bootstrap_reps", "pr_k", "is_splits", "latency_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"StudyConfig.{name} must be >= 1, got {getattr(self, name)}")

    def split_range(self, split: str) -> range:
        start = 0
        for name, n in self.split_sizes:
            if name == split:
                return range(start, start + n)
            start += n
        raise KeyError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")

    @property
    def num_images(self) -> int:
        return sum(n for _, n in self.split_sizes)

    def data(self) -> SyntheticShapes:
        size = get_preset("var-tiny").vae.image_size
        return SyntheticShapes(self.num_classes, self.num_images // self.num_classes, size,
                               self.data_seed, texture=self.texture, radius=self.radius)  # fmt: skip

    def split(self, name: str) -> Subset:
        return Subset(self.data(), self.split_range(name))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(guidance=self.guidance, top_k=self.top_k, top_p=self.top_p)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["evaluator"] = dataclasses.asdict(self.evaluator)
        return d


STUDIES: dict[str, StudyConfig] = {
    "default": StudyConfig(name="default"),
    "long": StudyConfig(
        name="long", steps=2000, finetune_steps=1000, per_class=500, sample_batch=250,
        vae=(("steps", 3000),),
        split_sizes=(("tokenizer", 10000), ("transformer", 30000), ("evaluator", 8000),
                     ("evaluator_test", 2000), ("reference", 5000), ("holdout", 5000)),
    ),  # fmt: skip
    # The whole pipeline at miniature size, for the tests (seconds per stage; numbers noisy).
    "miniature": StudyConfig(
        name="miniature", steps=10, finetune_steps=10, batch_size=4, per_class=4, sample_batch=20,
        vae=(("steps", 20), ("batch_size", 8)), bootstrap_reps=20, is_splits=2,
        latency_batch=2, latency_repeats=1,
        evaluator=ev.EvaluatorConfig(steps=60, batch_size=32),
        split_sizes=(("tokenizer", 100), ("transformer", 40), ("evaluator", 400),
                     ("evaluator_test", 100), ("reference", 100), ("holdout", 40)),
    ),  # fmt: skip
}


def get_study(name: str) -> StudyConfig:
    try:
        return STUDIES[name]
    except KeyError:
        raise KeyError(f"unknown study {name!r}; valid: {', '.join(STUDIES)}") from None


def with_dtype(study: StudyConfig, dtype: str | None, device: torch.device) -> StudyConfig:
    """``study`` sampling in ``dtype`` (None: unchanged); a bad name, or fp16 on a CPU, is one
    ValueError line before any work. A bf16 study's samples are cached apart from fp32's (the
    precision is in their settings, hence in their key)."""
    from mvar.precision import check_precision

    if dtype is None:
        check_precision(study.dtype, device)
        return study
    return dataclasses.replace(study, dtype=check_precision(dtype, device))


def study_code_fingerprint() -> str:
    """The code that produces the study's artifacts: the library and this module (not the
    report writer: rewording the report must not retrain anything)."""
    return code_fingerprint(extra=[Path(__file__)])


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


@dataclass
class Stages:
    """The cache and the study; every stage returns a completed :class:`Artifact`."""

    cache: ArtifactCache
    study: StudyConfig
    device: torch.device

    def data_key(self, split: str) -> dict[str, Any]:
        s = self.study
        return {"dataset": "SyntheticShapes", "classes": s.num_classes, "texture": s.texture,
                "radius": s.radius, "seed": s.data_seed, "range": [self.study.split_range(split).start,
                self.study.split_range(split).stop]}  # fmt: skip

    # -- tokenizer ------------------------------------------------------------------------------
    def vae(self) -> Artifact:
        from mvar.train_vae import VAETrainConfig, train_vae

        overrides = dict(self.study.vae)
        config = {"overrides": overrides, "data": self.data_key("tokenizer"),
                  "defaults": dataclasses.asdict(VAETrainConfig())}  # fmt: skip

        def build(folder: Path) -> dict[str, Any]:
            cfg = dataclasses.replace(
                VAETrainConfig(), out_dir=str(folder), device=str(self.device), **overrides
            )
            path = train_vae(cfg, data=self.study.split("tokenizer"))
            return {"file": Path(path).name, "sha256": sha256_file(path)}

        return self.cache.get_or_build("vae", config, {}, build)

    # -- evaluator ------------------------------------------------------------------------------
    def evaluator(self) -> Artifact:
        cfg = self.study.evaluator
        config = {"evaluator": dataclasses.asdict(cfg), "data": self.data_key("evaluator"),
                  "test": self.data_key("evaluator_test")}  # fmt: skip

        def build(folder: Path) -> dict[str, Any]:
            x, y = ev.dataset_uint8(self.study.split("evaluator"))
            model = ev.train_evaluator(cfg, x, y)
            xt, yt = ev.dataset_uint8(self.study.split("evaluator_test"))
            acc = ev.accuracy(model, xt, yt)
            path = ev.save_evaluator(model, folder / "evaluator.pth")
            log.info("evaluator held-out accuracy %.4f on %d images", acc, len(yt))
            return {"file": path.name, "sha256": sha256_file(path), "heldout_accuracy": acc,
                    "heldout_images": len(yt)}  # fmt: skip

        return self.cache.get_or_build("evaluator", config, {}, build)

    # -- tokens of the transformer training split -----------------------------------------------
    def tokens(self, vae_art: Artifact) -> TokenCache:
        config = {"data": self.data_key("transformer")}

        def build(folder: Path) -> dict[str, Any]:
            vae = load_vae(vae_art, self.device)
            tc = encode_dataset(vae, self.study.split("transformer"), batch_size=250)
            with atomic_path(folder / "tokens.pt") as tmp:
                torch.save({"idx_Bl": [t.to(torch.int16) for t in tc.idx_Bl],
                            "labels": tc.labels}, tmp)  # fmt: skip
            return {"file": "tokens.pt", "images": len(tc)}

        art = self.cache.get_or_build("tokens", config, {"vae": vae_art.info["sha256"]}, build)
        obj = torch.load(art.path / "tokens.pt", map_location="cpu", weights_only=True)
        return TokenCache([t.long() for t in obj["idx_Bl"]], obj["labels"])

    # -- transformers ---------------------------------------------------------------------------
    def transformer(
        self, name: str, vae_art: Artifact, tokens: TokenCache, init: Artifact | None = None
    ) -> Artifact:
        from mvar.train import TrainConfig, train

        s = self.study
        steps = s.finetune_steps if init is not None else s.steps
        preset = MODELS[name]
        recipe = {"model": preset, "steps": steps, "batch_size": s.batch_size, "lr": s.lr,
                  "warmup_steps": min(s.warmup_steps, steps), "seed": s.seed}  # fmt: skip
        inputs = {"vae": vae_art.info["sha256"]}
        if init is not None:
            inputs["init_from"] = init.info["sha256"]

        def build(folder: Path) -> dict[str, Any]:
            cfg = TrainConfig(
                out_dir=str(folder), vae_ckpt=str(vae_art.path / vae_art.info["file"]),
                init_from=None if init is None else str(init.path / init.info["file"]),
                synthetic_classes=s.num_classes, device=str(self.device),
                ckpt_every=max(steps // 4, 1), log_every=max(steps // 10, 1), **recipe,
            )  # fmt: skip
            path = train(cfg, tokens=tokens)
            return {"file": Path(path).name, "sha256": sha256_file(path), "history": "history.csv"}

        return self.cache.get_or_build(f"train-{name}", {"recipe": recipe, "data":
                                       self.data_key("transformer")}, inputs, build)  # fmt: skip

    # -- samples --------------------------------------------------------------------------------
    def samples(self, name: str, model_art: Artifact, vae_art: Artifact) -> Artifact:
        """``per_class`` images per class through the paper-scale generation code
        (:func:`mvar.generate.build_sampler` and :func:`~mvar.generate.generate_samples`: PNG
        folder, per-batch seeds, content-keyed settings.json)."""
        from mvar.generate import GenerationSettings, build_sampler, code_version, generate_samples

        s = self.study
        sampler = build_sampler(MODELS[name], model_art.path / model_art.info["file"],
                                vae_art.path / vae_art.info["file"], s.sampling(),
                                device=self.device, dtype=s.dtype)  # fmt: skip
        settings = GenerationSettings(
            model=name, guidance=s.guidance, top_k=s.top_k, top_p=s.top_p, seed=s.seed, dtype=s.dtype,
            per_class=s.per_class, classes=tuple(range(s.num_classes)), batch_size=s.sample_batch,
            code_version=code_version(), **sampler.provenance,  # type: ignore[arg-type]
        )  # fmt: skip
        config = {"settings": settings.to_json()}
        config["settings"].pop("git_sha", None)  # recorded for reading; code is in the key
        inputs = {"model": model_art.info["sha256"], "vae": vae_art.info["sha256"]}

        def build(folder: Path) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = generate_samples(sampler, settings, folder, device=self.device)
            return {"folder": out.name, "images": settings.num_images,
                    "na_backend": settings.na_backend, "seconds": time.perf_counter() - t0}  # fmt: skip

        return self.cache.get_or_build(f"samples-{name}", config, inputs, build)


def load_vae(art: Artifact, device: torch.device) -> torch.nn.Module:
    """The study's trained tokenizer from its artifact."""
    from mvar.checkpoint import load_vqvae

    return load_vqvae(art.path / art.info["file"], "var-tiny", device)


def load_model(name: str, art: Artifact, device: torch.device) -> torch.nn.Module:
    """A trained transformer of the study (report name -> preset) from its artifact."""
    return load_transformer(art.path / art.info["file"], MODELS[name], device=device)


def _na_backend(model: torch.nn.Module, device: torch.device, dtype: str = "fp32") -> str:
    """The neighbourhood-attention backend the model runs ("none" for VAR / scale-Markov)."""
    from mvar.generate import resolve_na_backend

    return resolve_na_backend(model, device, dtype)


# --------------------------------------------------------------------------------------------
# Image sets and metrics
# --------------------------------------------------------------------------------------------


def _batches(x_N3HW: torch.Tensor, batch: int = 500) -> Iterator[torch.Tensor]:
    for s in range(0, x_N3HW.shape[0], batch):
        yield x_N3HW[s : s + batch]


def folder_uint8(folder: Path) -> torch.Tensor:
    """uint8 (N, 3, H, W) of a sample folder, in index order (the generation code's reader)."""
    from mvar.evaluate import iter_images

    arr = np.concatenate(list(iter_images(folder, 500)))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, x_uint8: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """The tokenizer's reconstructions (encode to tokens, decode), uint8."""
    out = []
    for b in _batches(x_uint8, batch):
        img = b.float().div(127.5).sub(1)
        out.append(ev.to_uint8_B3HW(vae.fhat_to_img(vae.idx_to_fhat(vae.img_to_idx(img)))))
    return torch.cat(out)


def degrade(x_uint8: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A clearly degraded copy: Gaussian blur (sigma 1.5 px) plus Gaussian noise (std 0.15 in
    [-1, 1] units), deterministic."""
    from torchvision.transforms.functional import gaussian_blur

    g = torch.Generator().manual_seed(seed)
    img = gaussian_blur(x_uint8.float().div(127.5).sub(1), kernel_size=7, sigma=1.5)
    img = img + 0.15 * torch.randn(img.shape, generator=g)
    return ev.to_uint8_B3HW(img.clamp(-1, 1))


@dataclass
class SetScore:
    name: str
    fid: float
    fid_low: float
    fid_high: float
    inception_score: float
    precision: float
    recall: float
    class_accuracy: float
    images: int


def score_set(name: str, feats: ev.EvalFeatures, labels: np.ndarray, ref: ev.EvalFeatures,
              study: StudyConfig) -> SetScore:  # fmt: skip
    """Every Table 1 metric of one image set against the reference (the paper's metric code,
    :mod:`mvar.metrics`, on the evaluator's features)."""
    mu, sigma = feature_statistics(ref.features)
    fid, lo, hi = bootstrap_fid(feats.features, mu, sigma, reps=study.bootstrap_reps, seed=study.seed)
    is_mean, _ = inception_score(feats.logits, splits=study.is_splits)
    prec, rec = precision_recall(ref.features, feats.features, k=study.pr_k)
    acc = float((feats.predicted() == labels).mean())
    return SetScore(name, fid, lo, hi, is_mean, prec, rec, acc, len(feats))


# --------------------------------------------------------------------------------------------
# Compute at toy scale (Table 2 columns), measured on this machine
# --------------------------------------------------------------------------------------------


def history_rows(folder: Path) -> list[dict[str, str]]:
    import csv

    with (folder / "history.csv").open() as f:
        return list(csv.DictReader(f))


def train_step_seconds(history: list[dict[str, str]], cfg: Any, skip: int = 10) -> float:
    """Seconds per iteration of the actual training run under the model's own schedule: the
    median wall time of each chunk's iterations (the first ``skip`` iterations -- warm-up,
    first-touch allocations -- left out), weighted by the chunk's share of the schedule's
    cycle (:class:`mvar.schedule.TrainSchedule`; VAR: one chunk, every iteration)."""
    from mvar.schedule import TrainSchedule, scales_label

    schedule = TrainSchedule.for_config(cfg)
    rows = history[skip:] if len(history) > skip else history
    per_chunk: dict[tuple[int, ...], float] = {}
    for chunk in schedule.chunks:
        secs = [float(h["seconds"]) for h in rows if h["scales"] == scales_label(chunk)]
        if not secs:
            raise ValueError(f"training history has no iteration of chunk {scales_label(chunk)}")
        per_chunk[chunk] = float(np.median(secs))
    return schedule.weighted_mean(per_chunk)


def measure_compute(name: str, model: torch.nn.Module, vae: torch.nn.Module, tokens: TokenCache,
                    study: StudyConfig, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Peak memory of token generation, KV cache, sampling latency, attention GFLOPs, full-model
    GFLOPs per image and the training-step peak, on real tensors of the trained model on ``device``."""
    from mvar import profiling as prof
    from mvar.schedule import TrainSchedule, scales_label
    from mvar.step import make_optimizer, train_step

    s, B = study.sampling(), study.latency_batch
    labels = torch.arange(B, device=device) % study.num_classes
    kw = dict(guidance=s.guidance, top_k=s.top_k, top_p=s.top_p, g_seed=study.seed, dtype=study.dtype)
    out: dict[str, Any] = {"na_backend": _na_backend(model, device, study.dtype)}
    # Token generation: peak of live tensor bytes (weights of both networks included), exact
    # bytes of every storage the dispatcher creates while the real sampler runs.
    tracker = prof.LiveBytesTracker(round_to=1)
    tracker.track(prof.module_tensors(model, vae), "weights")
    with torch.no_grad(), tracker:
        res = model.sample(vae, labels, decode=False, **kw)
    out["generation_peak_memory"] = tracker.peak
    out["weights_bytes"] = tracker.peak_by_category.get("weights", 0)
    out["kv_cache"] = int(res.kv_cache_bytes)
    # Latency of one batch, tokens and decode, median of repeats after a warm-up.
    timing = prof.time_call(lambda: model.sample(vae, labels, **kw), device=device, warmup=1,
                            repeats=study.latency_repeats)  # fmt: skip
    out["sampling_latency"] = timing.median_s
    # Attention MACs per image of one sampling run (counted by hooks on the attention cores)
    # and, in the same run, the full model's MACs per image: every matmul/convolution the
    # sampler dispatches, guidance rows included (docs/counting.md §4).
    with torch.no_grad(), prof.AttentionCounter(model) as counter, \
            prof.ModelFlopCounter(model, vae, images=1) as full:  # fmt: skip
        model.sample(vae, labels[:1], **kw)
    out["attention_gflops"] = counter.result().gflops
    out["full_gflops_per_image"] = full.result().full_gflops_per_image
    out["vae_decode_gflops_per_image"] = full.result().vae_gflops_per_image
    # Training step: the trainer's own step (mvar.step.train_step: param groups, clipping,
    # AdamW) on a real batch; one warm-up iteration first so AdamW's state exists (steady
    # state), then every chunk of the model's schedule once, peak live bytes per chunk
    # (weights, gradients, optimizer state, activations); the max is the model's.
    train_model = copy.deepcopy(model).train()  # same weights and pinned NA backend
    opt = make_optimizer(train_model, lr=1e-6)
    idx_Bl, label_B = tokens.batch(torch.arange(study.batch_size) % len(tokens))
    with torch.no_grad():  # the frozen VQ-VAE, as in the trainer
        x_BLCv = vae.idx_to_teacher_input(idx_Bl)
    target_BL = torch.cat(idx_Bl, dim=1)
    schedule = TrainSchedule.for_config(train_model.config)
    train_step(train_model, opt, label_B, x_BLCv, target_BL, schedule.chunks[0])
    peaks: dict[str, int] = {}
    for chunk in schedule.chunks:
        tracker = prof.LiveBytesTracker(round_to=1)
        tracker.track(prof.module_tensors(train_model), "weights")
        tracker.track([t for st in opt.state.values() for t in st.values()
                       if isinstance(t, torch.Tensor)], "optimizer_state")  # fmt: skip
        tracker.track([x_BLCv, target_BL, label_B], "inputs")
        with tracker:
            train_step(train_model, opt, label_B, x_BLCv, target_BL, chunk)
        peaks[scales_label(chunk)] = tracker.peak
    out["train_peak_memory"] = max(peaks.values())
    out["train_peak_by_chunk"] = peaks
    return out


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    study: StudyConfig
    scores: dict[str, SetScore]
    evaluator_accuracy: float
    compute: dict[str, dict[str, Any]]
    train_seconds: dict[str, float]
    artifacts: dict[str, Artifact]
    vae_report: dict[str, Any]
    features: dict[str, ev.EvalFeatures]
    wall_seconds: float
    device: torch.device
    backends: dict[str, str]  # the NA backend each sample set was generated with ("none": no NA)
    images: dict[str, torch.Tensor]  # uint8 (N, 3, H, W) of the held-out set and every sample set


def trained_models(
    st: Stages, names: Sequence[str] = tuple(MODELS)
) -> tuple[dict[str, Artifact], TokenCache]:
    """The tokenizer and the listed transformers of the study (reused from the cache, or
    trained), and the token cache they trained on. MVAR-dagger needs VAR-tiny, trained first."""
    arts = {"vae": st.vae()}
    tokens = st.tokens(arts["vae"])
    for name in MODELS:
        if name in names or (name == "var-tiny" and "mvar-tiny-finetune" in names):
            init = arts["var-tiny"] if name == "mvar-tiny-finetune" else None
            arts[name] = st.transformer(name, arts["vae"], tokens, init=init)
    return arts, tokens


def run_study(study: StudyConfig, cache_dir: Path, device: torch.device) -> StudyResult:
    t_start = time.perf_counter()
    st = Stages(ArtifactCache(cache_dir, study_code_fingerprint()), study, device)
    arts, tokens = trained_models(st)
    arts["evaluator"] = st.evaluator()
    vae = load_vae(arts["vae"], device)
    clf = ev.load_evaluator(arts["evaluator"].path / arts["evaluator"].info["file"])

    # Real image sets.
    ref_x, _ = ev.dataset_uint8(study.split("reference"))
    hold_x, hold_y = ev.dataset_uint8(study.split("holdout"))
    feats = {"reference": ev.extract(clf, _batches(ref_x), "reference images")}
    labels: dict[str, np.ndarray] = {}
    sets = {"real-holdout": hold_x, "vqvae-reconstruction": reconstruct(vae, hold_x),
            "degraded": degrade(hold_x, study.seed)}  # fmt: skip
    for name, x in sets.items():
        feats[name] = ev.extract(clf, _batches(x), name)
        labels[name] = hold_y.numpy()
    from mvar.train_vae import reconstruction_report

    # The same uint8 held-out images the reconstruction FID uses.
    vae_report = reconstruction_report(vae, hold_x.float().div(127.5).sub(1))
    images = {"real-holdout": hold_x}

    # Samples of every model.
    for name in MODELS:
        arts[f"samples-{name}"] = st.samples(name, arts[name], arts["vae"])
        folder = arts[f"samples-{name}"].path / arts[f"samples-{name}"].info["folder"]
        images[name] = folder_uint8(folder)
        feats[name] = ev.extract(clf, _batches(images[name]), f"{name} samples")
        labels[name] = np.repeat(np.arange(study.num_classes), study.per_class)

    scores = {n: score_set(n, feats[n], labels[n], feats["reference"], study)
              for n in (*MODELS, *SANITY)}  # fmt: skip
    for n, sc in scores.items():
        log.info("%-24s FID %.3f [%.3f, %.3f] IS %.3f P %.3f R %.3f acc %.3f", n, sc.fid,
                 sc.fid_low, sc.fid_high, sc.inception_score, sc.precision, sc.recall,
                 sc.class_accuracy)  # fmt: skip

    # Compute columns, one model after the other in this process (ratios from one run).
    compute: dict[str, dict[str, Any]] = {}
    train_seconds: dict[str, float] = {}
    for name in ("var-tiny", "mvar-tiny", "mvar-tiny-scale-markov"):
        model = load_model(name, arts[name], device)
        compute[name] = measure_compute(name, model, vae, tokens, study, device)
        train_seconds[name] = train_step_seconds(history_rows(arts[name].path), model.config)
        compute[name]["train_step_time"] = train_seconds[name]
    backends = {name: str(arts[f"samples-{name}"].info["na_backend"]) for name in MODELS}
    return StudyResult(study, scores, float(arts["evaluator"].info["heldout_accuracy"]), compute,
                       train_seconds, arts, vae_report, feats, time.perf_counter() - t_start,
                       device, backends, images)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.embedded", description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="default",
                   help="default: <= 10 minutes on 2 CPU cores; long: more steps and samples "
                   "(same code, same files); miniature: seconds, for tests")  # fmt: skip
    p.add_argument("--out", default="reports/embedded", help="report folder (default %(default)s)")
    p.add_argument("--cache-dir", default=os.environ.get("MVAR_CACHE_DIR", "outputs/cache"),
                   help="content-keyed artifact cache (default $MVAR_CACHE_DIR or %(default)s)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="default %(default)s")
    p.add_argument("--dtype", choices=PRECISIONS, default=None,
                   help="sampling precision (default: the study's, fp32); bf16 = autocast")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> StudyResult:
    p = build_parser()
    args = p.parse_args(argv)
    for flag, path in (("--cache-dir", args.cache_dir), ("--out", args.out)):
        if Path(path).exists() and not Path(path).is_dir():  # before any work, one line
            p.error(f"{flag} {path} exists and is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from repro.embedded_report import write_report

    try:
        study = with_dtype(get_study(args.study), args.dtype, torch.device(args.device))
        result = run_study(study, Path(args.cache_dir), torch.device(args.device))
        write_report(result, Path(args.out))
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        if args.debug:
            raise
        sys.exit(f"error: {e}")
    log.info("embedded study %r done in %.1f s", args.study, result.wall_seconds)
    return result


if __name__ == "__main__":
    main()
