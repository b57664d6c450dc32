"""Training VAR's multi-scale residual VQ-VAE (docs/var.md §1), one process or ``torchrun``.

    python -m mvar.train_vae --vae vae-tiny --out outputs/vae/vae-tiny
    mvar train-vae --vae vae-tiny --steps 400 --out outputs/vae/vae-tiny
    torchrun --nproc_per_node=8 -m mvar.train_vae --vae vae-paper --data /imagenet/train ...

VAR released its tokenizer but not the code that trained it; this is our own recipe around
the official architecture and quantizer semantics (``VectorQuantizer2``):

* loss = MSE(x̂, x) [+ ``l1_weight``·L1(x̂, x)] + ``vq_weight``·vq, with vq the per-scale
  commitment (β) + codebook terms averaged over the scales and the straight-through f̂
  (:meth:`mvar.vqvae.MultiScaleQuantizer.forward`);
* codebook usage per scale is an EMA of hit counts in ``quantize.ema_vocab_hit_SV``; every
  ``dead_every`` steps the codes used below ``dead_threshold`` × the uniform rate at EVERY
  scale are re-initialised from the residuals of the current batch, drawn with equal weight
  per scale (the small scales, 1..16 tokens per image, are where collapse is reported:
  FoundationVision/VAR issues 22, 123, 170, 175), and their Adam moments are reset;
* Adam, linear warm-up then cosine decay to ``final_lr`` × the peak.

**Out of scope:** the paper-scale recipe's perceptual (LPIPS / VGG) and adversarial
(discriminator) losses. LPIPS needs pretrained VGG weights we cannot download, and a GAN loss
only pays off at scales far beyond a CPU budget. Without them, reconstructions of natural
images are blurrier than the released ``vae_ch160v4096z32.pth`` would give; on the project's
generated shapes the pixel loss reconstructs shapes and stripes (see :data:`TINY_RECIPE`).

Like the transformer trainer (``mvar.train``): the batch of step g is a pure function of
(seed, g), so an interrupted run resumes from ``last.pth`` (written atomically) and
reproduces the uninterrupted one bit for bit; a ``last.pth`` written with other settings is
refused. Outputs in ``--out``: ``last.pth`` (trainer state), ``vae.pth`` (a plain state dict:
``mvar.checkpoint.load_vqvae(path, "var-tiny")`` or with the config), ``history.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mvar import dist
from mvar.checkpoint import read_checkpoint
from mvar.config import VAE_PRESETS, VQVAEConfig, get_vae_preset
from mvar.data import SyntheticShapes, imagenet_folder
from mvar.io import atomic_torch_save, atomic_write
from mvar.vqvae import VQVAE

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_RECIPE",
    "VAETrainConfig",
    "build_parser",
    "lr_at",
    "main",
    "psnr01",
    "reconstruction_report",
    "train_vae",
]


@dataclass(frozen=True)
class VAETrainConfig:
    """One tokenizer training job. The defaults are the embedded study's recipe for
    ``vae-tiny`` on the generated shapes (:data:`TINY_RECIPE`)."""

    vae: str = "vae-tiny"
    out_dir: str = "outputs/vae/vae-tiny"
    steps: int = 600
    batch_size: int = 4  # global, over all ranks
    lr: float = 2e-3
    warmup_steps: int = 10
    final_lr: float = 0.1  # cosine decay to this fraction of the peak
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: off
    beta: float = 0.25  # commitment weight (VectorQuantizer2's default)
    vq_weight: float = 1.0
    l1_weight: float = 0.5
    dead_threshold: float = 0.3  # x the uniform rate 1/V of each scale's tokens
    dead_every: int = 20  # steps between dead-code checks; 0: never
    seed: int = 0
    data: str = "synthetic"  # "synthetic" or an ImageNet-layout image folder
    synthetic_classes: int = 10
    synthetic_per_class: int = 256
    synthetic_seed: int = 0
    synthetic_texture: bool = True
    synthetic_radius_low: float = 0.4
    synthetic_radius_high: float = 0.7
    ckpt_every: int = 100
    stop_after: int | None = None  # end this run after N steps (resume later)
    log_every: int = 50
    device: str = "auto"

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "lr", "ckpt_every", "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "beta", "vq_weight",
                        "l1_weight", "dead_threshold", "dead_every")  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.final_lr <= 1:
            raise ValueError(f"--final-lr must be in [0, 1] (a fraction of --lr), got {self.final_lr}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"--stop-after must be > 0 when given, got {self.stop_after}")
        if self.vae not in VAE_PRESETS:
            raise ValueError(f"unknown --vae {self.vae!r}; valid: {', '.join(sorted(VAE_PRESETS))}")
        if self.data == "synthetic":
            if self.synthetic_classes <= 0 or self.synthetic_per_class <= 0:
                raise ValueError(
                    f"--synthetic-classes and --synthetic-per-class must be > 0, got "
                    f"{self.synthetic_classes} and {self.synthetic_per_class}"
                )
            if not 0 < self.synthetic_radius_low <= self.synthetic_radius_high:
                raise ValueError(
                    f"need 0 < --synthetic-radius-low <= --synthetic-radius-high, got "
                    f"{self.synthetic_radius_low} and {self.synthetic_radius_high}"
                )

    @property
    def vae_config(self) -> VQVAEConfig:
        return get_vae_preset(self.vae)


#: The embedded study's tokenizer recipe: ``vae-tiny`` on the generated shapes (32 px,
#: textured, radius 0.4..0.7), 600 steps of 4 images, ~90 s on one CPU core. Chosen at a fixed
#: budget of ~90 CPU-seconds (1 thread; 2,560 training images, PSNR on 440 held-out ones):
#: batch 16 x 160 steps 21.6 dB, 8 x 320 22.9 dB, 4 x 640 23.4 dB (smaller batches, more
#: steps win); lr 4e-3 was worse than 2e-3 (21.5 vs 22.9 dB at 8 x 320); at 4 x 640, dead
#: threshold 0.3 instead of 0.03 raised usage at scales 1-8 (e.g. scale 3: 0.27 -> 0.39) and
#: L1 0.5 added ~0.3 dB, together 23.9 dB.
TINY_RECIPE = VAETrainConfig()

# Settings that only change how a run is sliced, logged or placed; all others must match
# the ``last.pth`` a run resumes from.
_RESUMABLE_CHANGES = ("out_dir", "stop_after", "log_every", "ckpt_every", "device")

_HELP = {
    "vae": "tokenizer preset: " + ", ".join(sorted(VAE_PRESETS)),
    "out_dir": "output folder (last.pth, vae.pth, history.csv); an existing last.pth is resumed",
    "steps": "optimizer steps in total",
    "batch_size": "images per step, over all ranks",
    "lr": "peak learning rate (Adam)",
    "warmup_steps": "linear warm-up steps from 0 to --lr",
    "final_lr": "cosine decay to this fraction of --lr at the last step",
    "weight_decay": "AdamW weight decay (0: plain Adam)",
    "grad_clip": "gradient-norm clip (0: off)",
    "beta": "commitment weight β in the vq loss",
    "vq_weight": "weight of the vq loss against the pixel loss",
    "l1_weight": "weight of an extra L1 pixel loss (MSE is always on)",
    "dead_threshold": "a code is dead when its EMA usage is below this x the uniform rate at every scale",
    "dead_every": "steps between dead-code re-initialisations (0: never)",
    "seed": "seed of initialisation, batches and re-initialisation",
    "data": "'synthetic' (generated shapes) or an ImageNet-layout folder root/<class>/<image>",
    "synthetic_classes": "generated data: number of classes",
    "synthetic_per_class": "generated data: images per class",
    "synthetic_seed": "generated data: seed of the images",
    "synthetic_texture": "generated data: striped shapes (true/false)",
    "synthetic_radius_low": "generated data: smallest shape radius (fraction of the half-width)",
    "synthetic_radius_high": "generated data: largest shape radius",
    "ckpt_every": "write last.pth every N steps",
    "stop_after": "end this run after N steps (resume by running again)",
    "log_every": "log a progress line every N steps",
    "device": "'auto' (this rank's GPU, else CPU), 'cpu', 'cuda:0', ...",
}


def _flag(name: str) -> str:
    return "out" if name == "out_dir" else name.replace("_", "-")


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine to ``final_lr``·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    t = (step - cfg.warmup_steps) / max(cfg.steps - 1 - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def psnr01(rec_B3HW: Tensor, img_B3HW: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], measured on [0, 1] (reconstruction clamped)."""
    err = ((rec_B3HW.float().clamp(-1, 1) - img_B3HW.float()) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / err.clamp_min(1e-10))


def _dataset(cfg: VAETrainConfig, image_size: int) -> Dataset:
    if cfg.data == "synthetic":
        return SyntheticShapes(
            cfg.synthetic_classes, cfg.synthetic_per_class, image_size, cfg.synthetic_seed,
            texture=cfg.synthetic_texture,
            radius=(cfg.synthetic_radius_low, cfg.synthetic_radius_high),
        )  # fmt: skip
    return imagenet_folder(cfg.data, image_size, recipe="var")


def _image(item: Any) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _fingerprint(data: Dataset) -> str:
    """Length and a hash of three items: enough to refuse resuming on other data."""
    n = len(data)  # type: ignore[arg-type]
    h = hashlib.sha256(str(n).encode())
    if hasattr(data, "samples"):  # an image folder: its file list, not augmented pixels
        h.update("\n".join(str(s[0]) for s in data.samples).encode())  # type: ignore[attr-defined]
    else:
        # Fixed seed for any random augmentation, without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for i in sorted({0, n // 2, n - 1}):
                h.update(_image(data[i]).float().contiguous().numpy().tobytes())
    return f"{n}:{h.hexdigest()[:16]}"


def _history_csv(history: list[dict[str, float]], num_scales: int) -> str:
    cols = ["step", "loss", "recon", "vq", "psnr", "lr", "seconds", "revived"]
    cols += [f"usage_s{s}" for s in range(num_scales)]
    lines = [",".join(cols)]
    for h in history:
        row = [str(int(h["step"])), f"{h['loss']:.6f}", f"{h['recon']:.6f}", f"{h['vq']:.6f}",
               f"{h['psnr']:.4f}", f"{h['lr']:.4e}", f"{h['seconds']:.4f}", str(int(h["revived"]))]  # fmt: skip
        row += [f"{h[f'usage_s{s}']:.4f}" for s in range(num_scales)]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def _check_resume_args(saved: dict[str, Any], cfg: VAETrainConfig, path: Path) -> None:
    now = dataclasses.asdict(cfg)
    diffs = [
        f"--{_flag(k)} {saved.get(k)!r} (saved) vs {now[k]!r} (now)"
        for k in now
        if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]
    if diffs:
        raise ValueError(
            f"{path} was written with other settings ({'; '.join(diffs)}); rerun with the "
            "saved settings to resume, or choose another --out"
        )


@torch.no_grad()
def _revive_dead_codes(vae: VQVAE, opt: torch.optim.Optimizer, rests: list[Tensor],
                       cfg: VAETrainConfig, step: int) -> int:  # fmt: skip
    """Re-initialise the dead codes (identical on every rank); returns how many."""
    q = vae.quantize
    dead = q.dead_codes(cfg.dead_threshold)  # from the all-reduced EMA: same on every rank
    n = int(dead.numel())
    if n == 0:
        return 0
    # Rank 0 draws from its residuals (seeded by (seed, step)) and broadcasts the vectors.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + 17)
    new_nCv = q.sample_residuals([r.cpu() for r in rests], n, g).to(q.embedding.weight.device)
    if dist.is_initialized():
        tdist.broadcast(new_nCv, src=0)
    q.replace_codes(dead, new_nCv)
    state = opt.state.get(q.embedding.weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return n


def _check_ranks_agree(vae: VQVAE, step: int) -> None:
    """Every rank must hold the same weights and usage statistics (DDP averages gradients,
    revival broadcasts rank 0's draw); a per-tensor checksum, compared across ranks, catches
    a divergence at the checkpoint instead of in the results."""
    sums = torch.stack([t.detach().double().sum() for t in vae.state_dict().values()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    tdist.all_gather(gathered, sums)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError(f"ranks hold different VQ-VAE states at step {step}")


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def train_vae(cfg: VAETrainConfig, data: Dataset | None = None) -> Path:
    """Run (or resume) a tokenizer training job; returns the path of ``vae.pth``.

    ``data`` (items ``(image, label)`` or images, (3, H, W) in [-1, 1]) replaces the data set
    that ``cfg.data`` names; in-process callers pass their own split.
    """
    vcfg = cfg.vae_config
    if data is None:
        data = _dataset(cfg, vcfg.image_size)
    n_data = len(data)  # type: ignore[arg-type]
    if n_data == 0:
        raise ValueError("the tokenizer training set is empty")
    first = _image(data[0])
    if tuple(first.shape) != (3, vcfg.image_size, vcfg.image_size):
        raise ValueError(
            f"training images must be (3, {vcfg.image_size}, {vcfg.image_size}) for {cfg.vae}, "
            f"got {tuple(first.shape)}"
        )
    distributed = dist.init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    device = dist.default_device() if cfg.device == "auto" else torch.device(cfg.device)
    out = Path(cfg.out_dir)
    last = out / "last.pth"
    fingerprint = _fingerprint(data)

    torch.manual_seed(cfg.seed)
    vae = VQVAE(vcfg).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                            weight_decay=cfg.weight_decay)  # fmt: skip
    start, history = 0, []
    if last.is_file():
        state = read_checkpoint(last)
        _check_resume_args(state["args"], cfg, last)
        if state.get("data") != fingerprint:
            raise ValueError(
                f"{last} was trained on other data ({state.get('data')}, now {fingerprint}); "
                "pass the same data set to resume, or choose another --out"
            )
        trainer = state["trainer"]
        vae.load_state_dict(trainer["vae_wo_ddp"])
        opt.load_state_dict(trainer["optimizer"])
        start, history = int(trainer["step"]), list(state["history"])
        logger.info("resuming %s at step %d from %s", cfg.vae, start, last)

    # A φ conv no scale uses (short pyramids) gets no gradient; DDP must be told.
    unused_phi = len(set(vae.phi_index)) < vcfg.share_quant_resi
    ddp = nn.parallel.DistributedDataParallel(vae, find_unused_parameters=unused_phi) if distributed else vae
    S = len(vcfg.patch_nums)

    def save(step: int) -> None:
        if distributed:
            _check_ranks_agree(vae, step)
        if rank == 0:
            state = {
                "trainer": {"vae_wo_ddp": vae.state_dict(), "optimizer": opt.state_dict(), "step": step},
                "history": history,
                "args": dataclasses.asdict(cfg),
                "data": fingerprint,
            }
            atomic_torch_save(state, last)
            atomic_write(out / "history.csv", lambda p: p.write_text(_history_csv(history, S)))
        dist.barrier()

    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    logger.info("training %s (%s) on %d images: steps %d..%d of %d, batch %d on %d rank(s), %s",
                cfg.vae, vcfg, n_data, start, end, cfg.steps, cfg.batch_size, world, device)  # fmt: skip
    t_run = time.perf_counter()
    revived_since_log = 0
    for step in range(start, end):
        t0 = time.perf_counter()
        # Everything random in step g derives from (seed, g, rank): resume repeats it exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(n_data, (cfg.batch_size,), generator=g)[rank::world]
        img = torch.stack([_image(data[int(i)]) for i in rows]).to(device)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr

        o = ddp(img, cfg.beta)
        recon = F.mse_loss(o.rec_B3HW, img)
        if cfg.l1_weight:
            recon = recon + cfg.l1_weight * F.l1_loss(o.rec_B3HW, img)
        loss = recon + cfg.vq_weight * o.vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()

        with torch.no_grad():
            hit_SV = o.hit_SV.detach()
            stats = torch.stack([loss.detach(), recon.detach(), o.vq_loss.detach(),
                                 psnr01(o.rec_B3HW.detach(), img).mean()])  # fmt: skip
            if distributed:
                tdist.all_reduce(hit_SV)
                tdist.all_reduce(stats)
                stats /= world
            vae.quantize.record_usage(hit_SV, step)
        revived = 0
        if cfg.dead_every and (step + 1) % cfg.dead_every == 0 and step + 1 < cfg.steps:
            revived = _revive_dead_codes(vae, opt, o.rest_nCv, cfg, step)
        revived_since_log += revived
        loss_v, recon_v, vq_v, psnr_v = stats.tolist()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"loss became {loss_v} at step {step}")
        tokens_S = torch.tensor([cfg.batch_size * pn * pn for pn in vcfg.patch_nums])
        usage_S = (hit_SV > 0).sum(1).cpu() / tokens_S.clamp(max=vcfg.vocab_size)
        history.append({"step": step, "loss": loss_v, "recon": recon_v, "vq": vq_v, "psnr": psnr_v,
                        "lr": lr, "seconds": time.perf_counter() - t0, "revived": revived,
                        **{f"usage_s{s}": float(usage_S[s]) for s in range(S)}})  # fmt: skip
        if step % cfg.log_every == 0 or step == end - 1:
            logger.info(
                "step %d/%d loss %.4f recon %.4f vq %.4f psnr %.2f dB lr %.2e usage/scale %s "
                "codes revived %d (%.2f s/step)", step + 1, cfg.steps, loss_v, recon_v, vq_v, psnr_v, lr,
                " ".join(f"{u:.2f}" for u in usage_S.tolist()), revived_since_log,
                (time.perf_counter() - t_run) / (step + 1 - start),
            )  # fmt: skip
            revived_since_log = 0
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < end:
            save(step + 1)
    save(end)
    final = out / "vae.pth"
    if end < cfg.steps:
        logger.info("stopping after %d steps as asked; rerun to resume", end - start)
    elif rank == 0:
        atomic_torch_save(vae.state_dict(), final)
        logger.info("wrote %s", final)
    dist.barrier()
    dist.destroy()
    return final


# --------------------------------------------------------------------------------------
# Reconstruction quality of a trained tokenizer
# --------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_report(vae: VQVAE, images: Tensor | Dataset, batch_size: int = 64) -> dict[str, Any]:
    """Reconstruct ``images`` ((N, 3, H, W) in [-1, 1], or a Dataset of them / of (image,
    label)) through the tokens, as a transformer would (``img_to_idx`` → ``idx_to_fhat`` →
    ``fhat_to_img``), and measure:

    * ``psnr``: per-image PSNR on [0, 1], averaged; ``mse``: per-image MSE on [0, 1], averaged;
    * ``usage_per_scale``: distinct codes used at scale s over the set / min(V, tokens at s);
    * ``perplexity_per_scale``: exp(entropy) of scale s's code histogram (V = uniform use);
    * ``distinct_codes``: codes used at any scale; ``num_images``, ``vocab_size``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    n = images.shape[0] if isinstance(images, Tensor) else len(images)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("reconstruction_report needs at least one image")
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    V, pns = vae.cfg.vocab_size, vae.cfg.patch_nums
    hist_SV = torch.zeros(len(pns), V, dtype=torch.float64)
    psnr_sum = mse_sum = 0.0
    for s in range(0, n, batch_size):
        if isinstance(images, Tensor):
            img = images[s : s + batch_size]
        else:
            img = torch.stack([_image(images[i]) for i in range(s, min(n, s + batch_size))])
        img = img.to(device).float()
        idx_Bl = vae.img_to_idx(img)
        rec = vae.fhat_to_img(vae.idx_to_fhat(idx_Bl))
        p = psnr01(rec, img)
        psnr_sum += float(p.double().sum())
        mse_sum += float(((rec - img) / 2).square().flatten(1).mean(1).double().sum())
        for si, t in enumerate(idx_Bl):
            hist_SV[si] += torch.bincount(t.flatten().cpu(), minlength=V).double()
    vae.train(was_training)
    prob_SV = hist_SV / hist_SV.sum(1, keepdim=True)
    entropy_S = -(prob_SV * prob_SV.clamp_min(1e-300).log()).sum(1)
    usage = [
        float((hist_SV[si] > 0).sum()) / min(V, n * pn * pn) for si, pn in enumerate(pns)
    ]
    return {
        "num_images": n,
        "vocab_size": V,
        "psnr": psnr_sum / n,
        "mse": mse_sum / n,
        "usage_per_scale": usage,
        "perplexity_per_scale": entropy_S.exp().tolist(),
        "distinct_codes": int((hist_SV.sum(0) > 0).sum()),
    }


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mvar train-vae", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    kinds = {"int": int, "float": float, "str": str, "bool": _bool}
    for f in dataclasses.fields(VAETrainConfig):
        base = str(f.type).replace(" | None", "")
        p.add_argument("--" + _flag(f.name), dest=f.name, type=kinds.get(base, str),
                       default=f.default, metavar=base.upper(),
                       help=f"{_HELP[f.name]} (default: %(default)s)")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = vars(build_parser().parse_args(argv))
    debug = args.pop("debug")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = VAETrainConfig(**args)
        if cfg.data != "synthetic" and not Path(cfg.data).is_dir():
            raise FileNotFoundError(
                f"--data {cfg.data!r} is not a folder; expected 'synthetic' or an ImageNet-layout "
                "folder root/<class>/<image>"
            )
        return train_vae(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if debug:
            raise
        raise SystemExit(f"mvar train-vae: error: {e}") from None


if __name__ == "__main__":
    main()
