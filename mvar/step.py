"""One training iteration of VAR or MVAR: the optimiser recipe and the step itself.

This is the one definition the trainer (``mvar.train``), the profiler (``repro.compute``,
time and memory of a training iteration) and the benchmarks (``bench/``) all run, so what is
timed is what is trained.

* AdamW (0.9, 0.95), weight decay on weight matrices and ``class_emb`` only (docs/var.md §4).
* Loss: cross-entropy of the chunk's tokens with weight 1/L per token — the plain mean over
  the pyramid for VAR; MVAR keeps 1/L on every chunk, not renormalised (docs/mvar.md §3).
* Gradient-norm clip (docs/var.md §4: 2.0), optional fp16 ``GradScaler`` / autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAMW_BETAS = (0.9, 0.95)  # docs/var.md §4
DEFAULT_WEIGHT_DECAY = 0.05  # docs/var.md §4
DEFAULT_GRAD_CLIP = 2.0  # docs/var.md §4 (tclip)


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


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """The trainer's AdamW over :func:`param_groups` (``foreach``/``fused`` pick the kernel)."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=ADAMW_BETAS, foreach=foreach, fused=fused
    )


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """fp16 on CUDA needs loss scaling (the official trainers' GradScaler); else a no-op one."""
    enabled = amp_dtype == torch.float16 and device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled)


def chunk_loss(logits_BlV: Tensor, target_BL: Tensor, scales: Sequence[int],
               begin_ends: Sequence[tuple[int, int]]) -> Tensor:  # fmt: skip
    """Cross-entropy of the tokens of ``scales`` (logits in scale order), weight 1/L per token
    where L is the whole pyramid's length (``target_BL`` holds all L targets)."""
    B, L = target_BL.shape
    target_Bl = torch.cat([target_BL[:, slice(*begin_ends[si])] for si in scales], dim=1)
    ce = F.cross_entropy(
        logits_BlV.float().reshape(-1, logits_BlV.shape[-1]), target_Bl.reshape(-1), reduction="sum"
    )
    return ce / (B * L)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    label_B: Tensor,
    x_BLCv: Tensor,
    target_BL: Tensor,
    scales: Sequence[int],
    *,
    grad_clip: float = DEFAULT_GRAD_CLIP,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    net: nn.Module | None = None,
) -> Tensor:
    """One iteration on the chunk ``scales``: forward (teacher forcing), loss, backward, clip,
    optimiser step; returns the detached loss. The learning rate is the caller's (set it on the
    optimizer's groups before). ``net`` is what runs the forward (a DDP wrapper of ``model``);
    ``model`` owns the parameters and the geometry. Gradients are freed after the step
    (``set_to_none``), so they do not sit in memory through the next forward."""
    net = model if net is None else net
    device_type = x_BLCv.device.type
    amp = (
        torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )
    with amp:
        logits = net(label_B, x_BLCv, scales=scales)
        loss = chunk_loss(logits, target_BL, scales, model.config.begin_ends)  # type: ignore[union-attr]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
