"""Training and fine-tuning VAR and MVAR (docs/var.md §4, docs/mvar.md §3), one process or ``torchrun``.

    python -m mvar.train --model mvar-tiny --steps 300 --out outputs/train/mvar-tiny
    torchrun --nproc_per_node=8 -m mvar.train --model mvar-d16 --data /imagenet/train \\
        --vae-ckpt vae_ch160v4096z32.pth --init-from var_d16.pth --batch-size 448 ...

* Targets are the frozen VQ-VAE's tokens; the loss is cross-entropy with weight 1/L per token
  (the plain mean over the pyramid for VAR; MVAR keeps 1/L on every chunk, not renormalised).
* Which scales iteration g trains is ``mvar.schedule.TrainSchedule``: VAR the whole sequence;
  MVAR the official ``ratio_k`` schedule (of every 10 iterations at 256 px, 8 on scales 0-7
  packed, one on scale 8, one on scale 9); each iteration sees a fresh batch. ``history.csv``
  records the scales of every iteration.
* The step itself (AdamW (0.9, 0.95), weight decay 0.05 on weight matrices and ``class_emb``
  only, gradient-norm clip 2, fp16 autocast + GradScaler (CUDA) or bf16 autocast) is
  ``mvar.step.train_step``, the same one the profiler times. lr = 1e-4·batch/256, warm-up from
  0.005×, then the official "lin0" schedule down to ``wpe``.
* The batch of step g is a pure function of (seed, g), split across ranks: an interrupted run
  resumes from ``last.pth`` (written atomically) and reproduces the uninterrupted one. A resume
  whose settings differ from the saved ones is refused unless ``--allow-changed-args``.
* Tokens (``--tokenize``): ``online`` loads each step's images through the recipe's random
  transform (a fresh crop, and flip where the recipe flips, seeded by (seed, g, row)) and
  encodes them with the frozen VQ-VAE in the loop, as the official VAR trainer does;
  ``cached`` tokenises the data once (``mvar.data.build_token_cache``: sharded over ranks,
  resumable, keyed by its inputs): for MVAR's recipe both flips, drawn per row and step, as
  the official MVAR trainer's latent cache does; for VAR's, one random crop per image frozen
  at encode time (``--crops K`` caches K and draws one per row and step). ``auto`` is online for the VAR recipe on an image folder and cached
  otherwise (docs/var.md §4.4, docs/mvar.md §3.3).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mvar import dist
from mvar.build import build_model, build_vqvae
from mvar.checkpoint import (
    CheckpointError,
    extract_transformer_state_dict,
    load_transformer_state_dict,
    load_vqvae,
    read_checkpoint,
    resolve_checkpoint,
)
from mvar.config import get_preset
from mvar.data import (
    SyntheticShapes,
    TokenCache,
    build_token_cache,
    draw_batch,
    encode_dataset,
    imagenet_folder,
    online_key,
    online_loader,
)
from mvar.io import atomic_torch_save, atomic_write
from mvar.schedule import OFFICIAL_RATIO_K, TrainSchedule, scales_label
from mvar.step import DEFAULT_GRAD_CLIP, DEFAULT_WEIGHT_DECAY, make_optimizer, make_scaler, param_groups, train_step

__all__ = ["TrainConfig", "TrainError", "lr_at", "param_groups", "train", "main"]

logger = logging.getLogger(__name__)

AMP_CHOICES = ("none", "fp16", "bf16")
RECIPE_CHOICES = ("auto", "var", "mvar")
TOKENIZE_CHOICES = ("auto", "cached", "online")


class TrainError(ValueError):
    """A training job that cannot start as asked (bad setting, incompatible resume file)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the CLI's options are these fields)."""

    model: str = "mvar-tiny"
    out_dir: str = "outputs/train/mvar-tiny"
    steps: int = 300
    batch_size: int = 16  # global, over all ranks
    lr: float | None = None  # None: 1e-4 · batch / 256 (docs/var.md §4)
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    warmup_steps: int | None = None  # None: steps / 50 (VAR's ep/50 epochs)
    wpe: float = 0.1  # final lr as a fraction of the peak (d16/d20)
    grad_clip: float = DEFAULT_GRAD_CLIP
    alng: float = 1e-3  # AdaLN γ init (README runs: 1e-3 for d16/d20)
    amp: str = "none"  # none | fp16 | bf16
    ratio_k: int = OFFICIAL_RATIO_K  # MVAR: iterations on the packed chunk per cycle
    seed: int = 0
    data: str = "synthetic"  # "synthetic" or an ImageNet-layout folder
    recipe: str = "auto"  # augmentation recipe for folders (var | mvar; auto: the model's own)
    tokenize: str = "auto"  # cached | online | auto (online for recipe var on a folder)
    workers: int = 4  # online mode: image-decoding DataLoader workers (0: in this process)
    crops: int = 1  # cached mode, recipe var: random crops per image in the token cache
    token_cache: str | None = None  # folder of the on-disk token cache; None: <out>/token_cache
    synthetic_classes: int = 10
    synthetic_per_class: int = 64
    vae_ckpt: str | None = None  # None: a seeded random-init VQ-VAE (embedded runs only)
    init_from: str | None = None  # fine-tune start, e.g. var_d16.pth into an MVAR preset
    ckpt_every: int = 100
    stop_after: int | None = None  # end this run after N steps (time-sliced jobs; resume later)
    log_every: int = 10
    device: str = "auto"
    allow_changed_args: bool = False  # resume even if the saved settings differ (recorded)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "ckpt_every", "log_every", "ratio_k", "crops",
                    "synthetic_classes", "synthetic_per_class")  # fmt: skip
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise TrainError(f"--stop-after must be a positive integer, got {self.stop_after}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise TrainError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "wpe", "alng"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
        if self.amp not in AMP_CHOICES:
            raise TrainError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.recipe not in RECIPE_CHOICES:
            raise TrainError(f"--recipe must be one of {', '.join(RECIPE_CHOICES)}, got {self.recipe!r}")
        if self.tokenize not in TOKENIZE_CHOICES:
            raise TrainError(f"--tokenize must be one of {', '.join(TOKENIZE_CHOICES)}, "
                             f"got {self.tokenize!r}")  # fmt: skip
        if not isinstance(self.workers, int) or self.workers < 0:
            raise TrainError(f"--workers must be an integer >= 0, got {self.workers!r}")
        try:
            arch = get_preset(self.model).arch
        except KeyError as e:
            raise TrainError(str(e.args[0])) from None
        if self.recipe == "auto":  # each official trainer's own recipe (docs/var.md §4.4, docs/mvar.md §3.3)
            object.__setattr__(self, "recipe", arch)
        if self.crops > 1 and (self.data == "synthetic" or self.recipe != "var"
                               or self.tokenize != "cached"):  # fmt: skip
            raise TrainError(f"--crops {self.crops} needs an image folder with --recipe var and "
                             f"--tokenize cached (the other ways have no frozen crop to multiply)")  # fmt: skip

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 1e-4 * self.batch_size / 256


#: Fields that change nothing the run computes: they may differ on resume.
RESUME_FREE_FIELDS = frozenset({"out_dir", "ckpt_every", "stop_after", "log_every", "device",
                                "allow_changed_args", "token_cache", "workers"})  # fmt: skip


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0.005× to the peak, then VAR's "lin0": flat for the first 5% of the
    rest, linear decay to ``wpe``·peak, flat for the last 5%."""
    peak = cfg.peak_lr()
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(cfg.steps // 50, 1)
    if step < warm:
        return peak * (0.005 + (1 - 0.005) * step / warm)
    rest = (step - warm) / max(cfg.steps - 1 - warm, 1)
    T = 0.05
    if rest < T:
        return peak
    if rest > 1 - T:
        return peak * cfg.wpe
    return peak * (cfg.wpe + (1 - cfg.wpe) * (1 - T - rest) / (1 - 2 * T))


def _device(name: str) -> torch.device:
    return dist.default_device() if name == "auto" else torch.device(name)


def tokenize_mode(cfg: TrainConfig, *, data_given: bool = False) -> str:
    """``cached`` or ``online`` for this run: ``auto`` is the official trainer's way for the
    recipe at paper scale (an image folder): VAR encodes on the fly, so every step sees a new
    random crop; MVAR's latent cache (both flips) loses nothing, its crop being the centre.
    Generated or in-process data have no random transform to keep alive: cached."""
    if cfg.tokenize != "auto":
        return cfg.tokenize
    folder = cfg.data != "synthetic" and not data_given
    return "online" if folder and cfg.recipe == "var" else "cached"


def _image_source(cfg: TrainConfig, vae: nn.Module, data: Dataset | None, *,
                  random_flip: bool) -> Dataset:  # fmt: skip
    """The run's images in [-1, 1] with their labels (each item through its random transform)."""
    if data is not None:
        return data
    if cfg.data == "synthetic":
        return SyntheticShapes(cfg.synthetic_classes, cfg.synthetic_per_class, vae.cfg.image_size, cfg.seed)
    return imagenet_folder(cfg.data, vae.cfg.image_size, cfg.recipe, random_flip=random_flip)


def _load_tokens(cfg: TrainConfig, vae: nn.Module, data: Dataset | None) -> TokenCache:
    if data is not None or cfg.data == "synthetic":
        return encode_dataset(vae, _image_source(cfg, vae, data, random_flip=False), seed=cfg.seed)
    # An image folder: the on-disk latent cache, sharded over ranks, resumable, keyed by its
    # inputs. MVAR's recipe flips half the images: both orientations are cached and the flip
    # is drawn per row and step. VAR's random crop is drawn once per image (seeded) and frozen.
    flips = cfg.recipe == "mvar"
    if cfg.recipe == "var":
        logger.warning("--tokenize cached with recipe var: %d random crop(s) per image, frozen "
                       "when tokenising (the official VAR trainer draws a new crop every step: "
                       "--tokenize online)", cfg.crops)  # fmt: skip
    folder = imagenet_folder(cfg.data, vae.cfg.image_size, cfg.recipe, random_flip=False)
    root = cfg.token_cache or str(Path(cfg.out_dir) / "token_cache")
    return build_token_cache(vae, folder, root, recipe=cfg.recipe, image_size=vae.cfg.image_size,
                             flips=flips, seed=cfg.seed, crops=cfg.crops)  # fmt: skip


def tokens_fingerprint(tokens: TokenCache) -> str:
    """sha256 of the token ids and labels: what the run trained on, checked on resume."""
    h = hashlib.sha256()
    for t in (*tokens.idx_Bl, tokens.labels, *(tokens.flip_idx_Bl or ())):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_tokens(tokens: TokenCache, mcfg: Any, source: str) -> None:
    """Tokens handed in must have this model's geometry and vocabulary."""
    want = [pn * pn for pn in mcfg.patch_nums]
    got = [int(t.shape[1]) for t in tokens.idx_Bl]
    if got != want:
        raise TrainError(f"{source}: tokens per scale {got} do not fit {mcfg.name} (expected {want})")
    if len(tokens) == 0:
        raise TrainError(f"{source}: the token cache is empty")
    hi = max(int(t.max()) for t in tokens.idx_Bl)
    if min(int(t.min()) for t in tokens.idx_Bl) < 0 or hi >= mcfg.vocab_size:
        raise TrainError(f"{source}: token ids outside 0..{mcfg.vocab_size - 1} (max {hi})")
    if int(tokens.labels.min()) < 0 or int(tokens.labels.max()) >= mcfg.num_classes:
        raise TrainError(f"{source}: labels outside 0..{mcfg.num_classes - 1}")


def _check_labels(images: Dataset, mcfg: Any) -> None:
    """An image folder's classes must fit the model (checked again on every batch)."""
    classes = getattr(images, "classes", None)
    if classes is not None and len(classes) > mcfg.num_classes:
        raise TrainError(f"--data has {len(classes)} classes; {mcfg.name} has {mcfg.num_classes}")


def _validate_paths(cfg: TrainConfig) -> Path:
    """Every path a run writes or reads, checked before any expensive step."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory; expected a folder for "
                         f"last.pth and history.csv")  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot create the output folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise TrainError(f"--out {out} is not writable")
    for flag, path in (("--vae-ckpt", cfg.vae_ckpt), ("--init-from", cfg.init_from)):
        if path is not None:
            try:
                resolve_checkpoint(path)
            except FileNotFoundError as e:
                raise TrainError(f"{flag}: {e}") from None
    if cfg.data != "synthetic" and not Path(cfg.data).is_dir():
        raise TrainError(f"--data {cfg.data} is not a folder; expected 'synthetic' or an "
                         f"ImageNet-layout folder root/<class>/<image>")  # fmt: skip
    return out


def _changed_args(saved: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose saved value differs from this run's (fields absent from an older file are
    taken at their default)."""
    now = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(TrainConfig())
    return {
        k: (saved.get(k, defaults[k]), v)
        for k, v in now.items()
        if k not in RESUME_FREE_FIELDS and saved.get(k, defaults[k]) != v
    }


def _read_resume_state(last: Path, arch: str, model_name: str) -> dict[str, Any]:
    """The trainer state of ``last.pth``, or one clear error if it is not one of ours."""
    try:
        state = read_checkpoint(last)
    except CheckpointError as e:
        raise TrainError(f"cannot resume: {e}") from None
    trainer = state.get("trainer") if isinstance(state, Mapping) else None
    if not isinstance(trainer, Mapping) or "step" not in trainer:
        raise TrainError(
            f"cannot resume from {last}: it is not a training checkpoint written by mvar.train "
            f"(no 'trainer' entry with a step; a plain or released state dict?). Move it away "
            f"or pass another --out; to start from its weights use --init-from"
        )
    key = f"{arch}_wo_ddp"
    if key not in trainer:
        other = [k for k in trainer if k.endswith("_wo_ddp")]
        raise TrainError(
            f"cannot resume {model_name} ({arch}) from {last}: it holds {', '.join(other) or 'no'} "
            f"weights, not {key!r} (another architecture); use another --out"
        )
    return dict(state)


def train(cfg: TrainConfig, *, tokens: TokenCache | None = None,
          data: Dataset | None = None) -> Path:  # fmt: skip
    """Run (or resume) a training job; returns the path of the final checkpoint.

    In-process callers may hand over ``tokens`` (a pre-computed :class:`TokenCache`, e.g. of
    their own data) or ``data`` (a data set of (image in [-1, 1], label) to tokenise with the
    run's VQ-VAE, once or, with ``tokenize="online"``, every step through its own random
    transform) instead of ``cfg.data``. The sha256 of what the run trains on (the tokens; or,
    online, the VQ-VAE's weights, the data listing, the recipe and the code) is stored in the
    checkpoint and checked on resume.
    """
    if tokens is not None and data is not None:
        raise TrainError("pass tokens or data, not both")
    mode = tokenize_mode(cfg, data_given=data is not None)
    if mode == "online" and tokens is not None:
        raise TrainError("--tokenize online encodes images every step: pass data (images), not tokens")
    if cfg.crops > 1 and (tokens is not None or data is not None):
        raise TrainError("--crops applies to the token cache of --data <folder>, not to tokens or "
                         "data passed in")  # fmt: skip
    distributed = dist.init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise TrainError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    if cfg.batch_size < world:
        raise TrainError(f"batch size {cfg.batch_size} is smaller than the {world} ranks")
    device = _device(cfg.device)
    mcfg = get_preset(cfg.model)
    out = _validate_paths(cfg)
    last = out / "last.pth"
    schedule = TrainSchedule.for_config(mcfg, cfg.ratio_k)

    # Everything that can refuse the run is checked before tokenising (the expensive part).
    state = _read_resume_state(last, mcfg.arch, mcfg.name) if last.is_file() else None
    arg_changes: list[dict[str, Any]] = list(state.get("arg_changes", [])) if state else []
    if state is not None:
        changed = _changed_args(state.get("args", {}), cfg)
        if changed and not cfg.allow_changed_args:
            diff = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise TrainError(
                f"cannot resume from {last}: settings differ from the saved run ({diff}); "
                f"use the saved settings, another --out, or --allow-changed-args to continue "
                f"with the new ones (both are recorded)"
            )
        if changed:
            logger.warning("resuming %s with changed settings: %s", last, changed)
            arg_changes.append({"step": int(state["trainer"]["step"]),
                                "saved": state.get("args", {}), "now": dataclasses.asdict(cfg)})  # fmt: skip

    model = build_model(mcfg, device="cpu", init=False)
    torch.manual_seed(cfg.seed)
    model.init_weights(init_adaln_gamma=cfg.alng)
    if cfg.init_from:
        try:
            sd = extract_transformer_state_dict(read_checkpoint(cfg.init_from), cfg.init_from)
            load_transformer_state_dict(model, sd, cfg.init_from)  # MVAR rebuilds its mask
        except CheckpointError as e:
            raise TrainError(f"--init-from: {e}") from None
        logger.info("initialised %s from %s", mcfg.name, cfg.init_from)
    if state is not None:
        try:
            load_transformer_state_dict(model, state["trainer"][f"{mcfg.arch}_wo_ddp"], str(last))
        except CheckpointError as e:
            raise TrainError(f"cannot resume: {e}") from None

    torch.manual_seed(cfg.seed)
    if cfg.vae_ckpt:
        vae = load_vqvae(cfg.vae_ckpt, mcfg, device)
    else:
        logger.warning("no --vae-ckpt: using a seeded random-init VQ-VAE (embedded runs only)")
        vae = build_vqvae(mcfg.vae, device).eval()
    vae.requires_grad_(False)
    images: Dataset | None = None  # online mode: the images, encoded every step
    if mode == "online":
        images = _image_source(cfg, vae, data, random_flip=True)
        _check_labels(images, mcfg)
        try:
            key = online_key(vae, images, recipe=cfg.recipe, image_size=vae.cfg.image_size, seed=cfg.seed)
        except ValueError as e:
            raise TrainError(f"--tokenize online: {e}") from None
        fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        num_images = len(images)  # type: ignore[arg-type]
        logger.info("tokenising online: %d images through recipe %s, encoded every step", num_images, cfg.recipe)
    else:
        if tokens is None:
            tokens = _load_tokens(cfg, vae, data)
            _check_tokens(tokens, mcfg, "tokenised data")
        else:
            _check_tokens(tokens, mcfg, "tokens passed to train()")
        fingerprint = tokens_fingerprint(tokens)
        num_images = len(tokens)
    if state is not None and state.get("tokens_sha256", fingerprint) != fingerprint:
        if not cfg.allow_changed_args:
            raise TrainError(
                f"cannot resume from {last}: the training tokens differ from the saved run's "
                f"(sha256 {state['tokens_sha256'][:12]}… vs {fingerprint[:12]}…: other data, "
                f"VQ-VAE, recipe or tokenising mode); use the same data, another --out, or "
                f"--allow-changed-args"
            )
        arg_changes.append({"step": int(state["trainer"]["step"]),
                            "saved": {"tokens_sha256": state["tokens_sha256"]},
                            "now": {"tokens_sha256": fingerprint}})  # fmt: skip

    model.to(device).train()
    opt = make_optimizer(model, cfg.peak_lr(), cfg.weight_decay, fused=device.type == "cuda" or None)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.amp)
    scaler = make_scaler(amp_dtype, device)

    start, history = 0, []
    if state is not None:
        trainer = state["trainer"]
        opt.load_state_dict(trainer["optimizer"])
        scaler.load_state_dict(trainer["scaler"])
        start, history = int(trainer["step"]), list(state.get("history", []))
        logger.info("resuming %s at step %d from %s", mcfg.name, start, last)
        if start > cfg.steps:
            raise TrainError(f"cannot resume from {last}: it is at step {start}, beyond --steps {cfg.steps}")

    ddp = (
        nn.parallel.DistributedDataParallel(model, find_unused_parameters=mcfg.arch == "mvar")
        if distributed
        else model
    )

    def save(step: int) -> Path:
        if rank == 0:
            state = {
                "trainer": {
                    f"{mcfg.arch}_wo_ddp": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                },
                "history": history,
                "args": dataclasses.asdict(cfg),
                "arg_changes": arg_changes,
                "tokens_sha256": fingerprint,
            }
            atomic_torch_save(state, last)
            lines = ["step,scales,loss,lr,seconds"] + [
                f"{h['step']},{h['scales']},{h['loss']:.6f},{h['lr']:.3e},{h['seconds']:.4f}"
                for h in history
            ]
            atomic_write(out / "history.csv", lambda p: p.write_text("\n".join(lines) + "\n"))
        dist.barrier()
        return last

    # This process runs steps start .. end-1; stop_after ends it early (resumable).
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    logger.info("training %s: steps %d..%d of %d, schedule %s", mcfg.name, start, end, cfg.steps,
                schedule.describe())  # fmt: skip
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {mcfg.name}",
               disable=rank != 0)  # fmt: skip
    # Online: this rank's images of steps start..end-1, decoded (and augmented) by workers.
    batches = None
    if images is not None:
        loader = online_loader(images, batch_size=cfg.batch_size, seed=cfg.seed, start=start,
                               end=end, rank=rank, world=world, workers=cfg.workers,
                               pin_memory=device.type == "cuda")  # fmt: skip
        batches = iter(loader)
    for step in bar:
        scales = schedule.chunk_at(step)
        # Everything random in step g (batch rows, flips and crops, label dropout, drop-path)
        # derives from (seed, g, rank), so a resumed run repeats the uninterrupted one exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        if batches is not None:
            img_B3HW, label_B = next(batches)
            if int(label_B.min()) < 0 or int(label_B.max()) >= mcfg.num_classes:
                raise TrainError(f"step {step}: labels outside 0..{mcfg.num_classes - 1}")
            t0 = time.perf_counter()  # the step's time includes encoding (not decoding)
            with torch.no_grad():
                idx_Bl = vae.img_to_idx(img_B3HW.to(device, non_blocking=True))
        else:
            assert tokens is not None
            draw = draw_batch(num_images, cfg.batch_size, cfg.seed, step)
            # The 50% horizontal flip of MVAR's recipe, drawn per row and step (cached both ways).
            flip_B = draw.flip_B[rank::world] if tokens.has_flips else None
            # --crops K: one of the K cached crops per row and step, from the row's own seed.
            crop_B = draw.aug_seed_B[rank::world] % tokens.crops if tokens.crops > 1 else None
            idx_Bl, label_B = tokens.batch(draw.rows_B[rank::world], flip_B, crop_B)
            idx_Bl = [t.to(device) for t in idx_Bl]
            t0 = time.perf_counter()
        label_B = label_B.to(device)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x_BLCv = vae.idx_to_teacher_input(idx_Bl)
        loss = train_step(model, opt, label_B, x_BLCv, torch.cat(idx_Bl, dim=1), scales,
                          grad_clip=cfg.grad_clip, amp_dtype=amp_dtype, scaler=scaler, net=ddp)  # fmt: skip
        loss_value = loss.item()  # one device sync per step
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        history.append({"step": step, "scales": scales_label(scales), "loss": loss_value,
                        "lr": lr, "seconds": time.perf_counter() - t0})  # fmt: skip
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if not bar.disable and not sys.stderr.isatty():
                logger.info("step %d/%d scales %s loss %.4f lr %.2e", step, cfg.steps,
                            scales_label(scales), loss_value, lr)  # fmt: skip
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < end:
            save(step + 1)
    if end < cfg.steps:
        logger.info("stopping after %d steps as asked; rerun to resume", end - start)
    path = save(end)
    dist.destroy()
    return path


#: Help text of every option (``mvar train --help`` shows it with the default).
HELP: dict[str, str] = {
    "model": "model preset (mvar presets lists them), e.g. mvar-tiny, var-d16, mvar-d16",
    "out_dir": "output folder: last.pth (resumable) and history.csv",
    "steps": "total training iterations (one chunk of scales each for MVAR)",
    "batch_size": "global batch size over all ranks",
    "lr": "peak learning rate; default 1e-4 * batch / 256 (VAR)",
    "weight_decay": "AdamW weight decay on weight matrices and class_emb",
    "warmup_steps": "linear warm-up iterations; default steps / 50",
    "wpe": "final learning rate as a fraction of the peak (VAR's lin0 schedule)",
    "grad_clip": "gradient-norm clip (0 disables)",
    "alng": "AdaLN gamma init scale (official 1e-3 for d16/d20)",
    "amp": "mixed precision: fp16 (autocast + GradScaler on CUDA) or bf16 autocast",
    "ratio_k": "MVAR: iterations on the packed chunk 0..refine_step-1 per cycle, followed by "
               "one iteration per later scale (official 8; VAR ignores it)",
    "seed": "seed of initialisation, batches, label dropout and drop-path",
    "data": "'synthetic' (generated shapes) or an ImageNet-layout folder root/<class>/<image>",
    "recipe": "augmentation recipe for image folders: var (resize 1.125x, random crop) or "
              "mvar (ADM centre crop, horizontal flips); auto: the model's own (var for VAR "
              "presets, mvar for MVAR presets, as each official trainer)",
    "tokenize": "online: every step loads its images through the recipe's random transform "
                "(a new crop, and flip for mvar) and encodes them with the frozen VQ-VAE, as the "
                "official VAR trainer; cached: tokenise once into the token cache (recipe mvar: "
                "both flips, drawn per step, as the official MVAR trainer's latent cache; recipe "
                "var: the random crop is frozen per image, see --crops); auto: online for recipe var on an image folder, "
                "cached otherwise",
    "workers": "online mode: DataLoader workers decoding images (0: in the training process; "
               "the batches are the same for any number)",
    "crops": "cached mode with recipe var: cache this many random crops per image and draw "
             "one per row and step (more augmentation than one frozen crop, K times the "
             "encoding; online is the official VAR trainer's way)",
    "token_cache": "folder of the token cache of an image folder (sharded over ranks, "
                   "resumable, keyed by VQ-VAE, data listing, recipe and code); default "
                   "<out>/token_cache",
    "synthetic_classes": "synthetic data: number of classes",
    "synthetic_per_class": "synthetic data: images per class",
    "vae_ckpt": "VQ-VAE weights (vae_ch160v4096z32.pth); default a seeded random VQ-VAE "
                "(embedded runs only)",
    "init_from": "start from these transformer weights (fine-tuning, e.g. var_d16.pth into "
                 "an MVAR preset)",
    "ckpt_every": "write last.pth every N iterations",
    "stop_after": "end this process after N iterations (resume later from last.pth)",
    "log_every": "log loss and lr every N iterations",
    "device": "torch device, or auto (this rank's CUDA device, else CPU)",
    "allow_changed_args": "resume even if settings differ from the saved run (both recorded "
                          "in last.pth under arg_changes)",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the 20-line usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mvar train", description=__doc__, formatter_class=_HelpFormatter)
    kinds = {"int": int, "float": float, "str": str}
    choices = {"amp": AMP_CHOICES, "recipe": RECIPE_CHOICES, "tokenize": TOKENIZE_CHOICES}
    for f in dataclasses.fields(TrainConfig):
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        base = str(f.type).replace(" | None", "")
        if base == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", help=HELP[f.name])
        else:
            p.add_argument(flag, dest=f.name, type=kinds[base], default=f.default,
                           choices=choices.get(f.name), help=HELP[f.name])  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug") or bool(os.environ.get("MVAR_DEBUG"))
    try:
        return train(TrainConfig(**args))
    except (TrainError, CheckpointError, FileNotFoundError) as e:
        if debug:
            raise
        parser.exit(2, f"mvar train: error: {e}\n")


if __name__ == "__main__":
    main()
