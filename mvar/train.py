"""Training and fine-tuning VAR and MVAR (docs/var.md §4, docs/mvar.md §3), one process or ``torchrun``.

    python -m mvar.train --model mvar-tiny --steps 300 --out outputs/train/mvar-tiny
    torchrun --nproc_per_node=8 -m mvar.train --model mvar-d16 --data /imagenet/train \\
        --vae-ckpt vae_ch160v4096z32.pth --init-from var_d16.pth --batch-size 448 ...

* Targets are the frozen VQ-VAE's tokens; the loss is cross-entropy with weight 1/L per token
  (the plain mean over the pyramid for VAR; MVAR keeps 1/L on every chunk, not renormalised).
* VAR trains the whole L-token sequence at once. MVAR trains one chunk of scales per
  iteration, iteration g taking chunk g mod (number of chunks): scales 0..7 packed, then 8,
  then 9 (``MVAR.chunks``) — "parallel training across scales"; each chunk sees a fresh batch.
* AdamW (0.9, 0.95), weight decay 0.05 on weight matrices and ``class_emb`` only, lr =
  1e-4·batch/256, warm-up from 0.005×, then the official "lin0" schedule down to ``wpe``;
  gradient-norm clip 2; fp16 autocast + GradScaler (CUDA) or bf16 autocast.
* The batch of step g is a pure function of (seed, g), split across ranks: an interrupted run
  resumes from ``last.pth`` (written atomically) and reproduces the uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mvar import dist
from mvar.build import build_model, build_vqvae
from mvar.checkpoint import extract_transformer_state_dict, load_vqvae, read_checkpoint
from mvar.config import get_preset
from mvar.data import SyntheticShapes, TokenCache, encode_dataset, imagenet_folder
from mvar.io import atomic_torch_save, atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "mvar-tiny"
    out_dir: str = "outputs/train/mvar-tiny"
    steps: int = 300
    batch_size: int = 16  # global, over all ranks
    lr: float | None = None  # None: 1e-4 · batch / 256 (docs/var.md §4)
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: steps / 50 (VAR's ep/50 epochs)
    wpe: float = 0.1  # final lr as a fraction of the peak (d16/d20)
    grad_clip: float = 2.0
    alng: float = 1e-3  # AdaLN γ init (README runs: 1e-3 for d16/d20)
    amp: str = "none"  # none | fp16 | bf16
    seed: int = 0
    data: str = "synthetic"  # "synthetic" or an ImageNet-layout folder
    recipe: str = "var"  # augmentation recipe for folders (var | mvar)
    synthetic_classes: int = 10
    synthetic_per_class: int = 64
    vae_ckpt: str | None = None  # None: a seeded random-init VQ-VAE (embedded runs only)
    init_from: str | None = None  # fine-tune start, e.g. var_d16.pth into an MVAR preset
    ckpt_every: int = 100
    stop_after: int | None = None  # end this run after N steps (time-sliced jobs; resume later)
    log_every: int = 10
    device: str = "auto"

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 1e-4 * self.batch_size / 256


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay weight matrices and ``class_emb`` only (docs/var.md §4): no decay for biases, q/v bias,
    scale_mul, pos_start, pos_1LC or lvl_embed."""
    no_decay_names = ("pos_start", "pos_1LC", "lvl_embed.", "scale_mul_1H11")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and not any(k in name for k in no_decay_names)
        (decay if is_matrix or name.startswith("class_emb") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def iteration_chunks(model: nn.Module) -> list[Sequence[int] | None]:
    """The scale groups training cycles through, one per iteration: MVAR's chunks (docs/mvar.md §3),
    or ``[None]`` (the whole sequence) for VAR."""
    if model.config.arch == "mvar":  # type: ignore[union-attr]
        return list(model.chunks(range(len(model.config.patch_nums))))  # type: ignore[operator,union-attr]
    return [None]


def token_loss(model: nn.Module, vae: nn.Module, idx_Bl: list[Tensor], label_B: Tensor,
               scales: Sequence[int] | None) -> Tensor:  # fmt: skip
    """Cross-entropy of the tokens of ``scales`` (all for VAR), weight 1/L per token."""
    x_BLCv = vae.idx_to_teacher_input(idx_Bl)
    if scales is None:
        logits = model(label_B, x_BLCv)
        target = torch.cat(idx_Bl, dim=1)
    else:
        logits = model(label_B, x_BLCv, scales=scales)
        target = torch.cat([idx_Bl[si] for si in scales], dim=1)
    B, L = label_B.shape[0], sum(t.shape[1] for t in idx_Bl)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return ce / (B * L)


def _device(name: str) -> torch.device:
    return dist.default_device() if name == "auto" else torch.device(name)


def _load_tokens(cfg: TrainConfig, vae: nn.Module) -> TokenCache:
    if cfg.data == "synthetic":
        data = SyntheticShapes(
            cfg.synthetic_classes, cfg.synthetic_per_class, vae.cfg.image_size, cfg.seed
        )
    else:
        data = imagenet_folder(cfg.data, vae.cfg.image_size, cfg.recipe)
    # Tokenising once is the official latent cache; for ImageNet use a pre-built cache at scale.
    return encode_dataset(vae, data)


def train(cfg: TrainConfig, tokens: TokenCache | None = None) -> Path:
    """Run (or resume) a training job; returns the path of the final checkpoint.

    ``tokens``: the training set already tokenised with the VQ-VAE of ``cfg.vae_ckpt``
    (in-process callers such as the embedded study); by default ``cfg.data`` is encoded here."""
    distributed = dist.init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    device = _device(cfg.device)
    mcfg = get_preset(cfg.model)
    out = Path(cfg.out_dir)
    last = out / "last.pth"

    torch.manual_seed(cfg.seed)
    if cfg.vae_ckpt:
        vae = load_vqvae(cfg.vae_ckpt, mcfg, device)
    else:
        logger.warning("no --vae-ckpt: using a seeded random-init VQ-VAE (embedded runs only)")
        vae = build_vqvae(mcfg.vae, device).eval()
    vae.requires_grad_(False)
    tokens = tokens if tokens is not None else _load_tokens(cfg, vae)

    model = build_model(mcfg, device="cpu", init=False)
    torch.manual_seed(cfg.seed)
    model.init_weights(init_adaln_gamma=cfg.alng)
    if cfg.init_from:
        sd = extract_transformer_state_dict(read_checkpoint(cfg.init_from), cfg.init_from)
        model.load_state_dict(sd, strict=True)  # MVAR rebuilds its mask (docs/mvar.md §3)
        logger.info("initialised %s from %s", mcfg.name, cfg.init_from)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.peak_lr(),
                            betas=(0.9, 0.95), fused=device.type == "cuda")  # fmt: skip
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and device.type == "cuda")

    start, history = 0, []
    if last.is_file():
        state = read_checkpoint(last)
        trainer = state["trainer"]
        model.load_state_dict(trainer[f"{mcfg.arch}_wo_ddp"])
        opt.load_state_dict(trainer["optimizer"])
        scaler.load_state_dict(trainer["scaler"])
        start, history = int(trainer["step"]), list(state.get("history", []))
        logger.info("resuming %s at step %d from %s", mcfg.name, start, last)

    ddp = (
        nn.parallel.DistributedDataParallel(model, find_unused_parameters=mcfg.arch == "mvar")
        if distributed
        else model
    )
    chunks = iteration_chunks(model)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.amp)

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
            }
            atomic_torch_save(state, last)
            lines = ["step,chunk,loss,lr,seconds"] + [
                f"{h['step']},{h['chunk']},{h['loss']:.6f},{h['lr']:.3e},{h['seconds']:.4f}"
                for h in history
            ]
            atomic_write(out / "history.csv", lambda p: p.write_text("\n".join(lines) + "\n"))
        dist.barrier()
        return last

    # This process runs steps start .. end-1; stop_after ends it early (resumable).
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {mcfg.name}",
               disable=rank != 0)  # fmt: skip
    for step in bar:
        chunk = chunks[step % len(chunks)]
        # Everything random in step g (batch rows, label dropout, drop-path) derives from
        # (seed, g, rank), so a resumed run repeats the uninterrupted one exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(len(tokens), (cfg.batch_size,), generator=g)[rank::world]
        idx_Bl, label_B = tokens.batch(rows)
        idx_Bl, label_B = [t.to(device) for t in idx_Bl], label_B.to(device)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = token_loss(ddp, vae, idx_Bl, label_B, chunk)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        loss_value = loss.item()  # one device sync per step
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        history.append({"step": step, "chunk": -1 if chunk is None else chunk[0],
                        "loss": loss_value, "lr": lr, "seconds": time.perf_counter() - t0})  # fmt: skip
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < end:
            save(step + 1)
    if end < cfg.steps:
        logger.info("stopping after %d steps as asked; rerun to resume", end - start)
    path = save(end)
    dist.destroy()
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out_dir":
            flag = "--out"
        kind = {"int": int, "float": float, "str": str}
        base = str(f.type).replace(" | None", "")
        p.add_argument(flag, dest=f.name, type=kind.get(base, str), default=f.default)
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    main()
