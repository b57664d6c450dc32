"""Next-scale sampling shared by VAR and MVAR (docs/var.md §3, docs/mvar.md §5).

The loop is the same for both models; what differs is how one scale's hidden states are
computed (``ScaleStep``: VAR through its KV cache, MVAR as an independent forward) and what
a classifier-free guidance scale ``guidance == 1.0`` means:

* VAR always runs the conditional and the unconditional half and mixes
  ``(1 + t)·cond − t·uncond`` with ``t = guidance · si / (S − 1)``: guidance ramps up even at 1.
* MVAR runs the conditional rows only, with no guidance at all, when ``guidance == 1.0``.

The official samplers behave this way and the parity fixtures encode it, so each model keeps
its own rule, declared by ``GUIDANCE_ONE_RUNS_UNCONDITIONAL`` on the model class and recorded
as ``SampleOutput.guided``. (The official code calls the guidance scale ``cfg``; here ``cfg``
means a config object everywhere, and ``sample`` accepts ``cfg=`` only as an alias.)

Random numbers follow the official code exactly, so sampled tokens match token for token on the
CPU: a generator on the model's device reseeded with ``g_seed`` at the start of each call; per
scale one ``multinomial(softmax(filtered), 1, replacement=True)`` over the B·pn² rows; with
``more_smooth`` the Gumbel noise is then drawn from the same generator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# step(si, x_BlC, cond_BD) -> hidden states h_BlC of scale si (rows = 2B with guidance, else B)
ScaleStep = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class SampleOutput:
    """What one sampling call produced (B images)."""

    idx_Bl: list[Tensor]  # per scale (B, pn*pn) int64
    fhat: Tensor  # (B, Cvae, N, N) cumulative f̂
    img01: Tensor | None  # (B, 3, H, W) in [0, 1], or None with decode=False
    guided: bool  # whether an unconditional half ran and was mixed in
    guided_logits: list[Tensor] | None = None  # per scale (B, pn*pn, V), before filtering
    kv_cache_bytes: int = 0  # bytes held by the KV cache at the end (VAR); 0 for MVAR


_clamp_logged: set[tuple[int, int]] = set()


def check_sampling_settings(
    guidance: float, top_k: int, top_p: float, vocab_size: int | None = None
) -> int:
    """Validate sampling settings in one place (the sampler and the command lines call it);
    returns the effective top_k. Raises ValueError with one line saying what is allowed.

    - ``guidance``: a finite number >= 0 (0 = no guidance mixing; 1 = VAR's default ramp).
    - ``top_k``: an integer >= 0, 0 = off. A ``top_k`` at or above the vocabulary keeps every
      token, i.e. it filters nothing: it is *clamped* to the vocabulary size with one INFO line
      (not an error, so that the official settings, top_k 900/1200, run on the tiny models'
      512-token codebook too).
    - ``top_p``: a number in [0, 1], 0 = off (NaN is refused: it would silently mean off).
    """
    g = guidance
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
        raise ValueError(f"guidance (cfg) must be a finite number >= 0, got {g!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float))
        or not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0
    ):  # fmt: skip
        raise ValueError(f"top_p must be a number in [0, 1] (0 = off), got {top_p!r}")
    if vocab_size is not None and top_k > vocab_size:
        if (top_k, vocab_size) not in _clamp_logged:
            _clamp_logged.add((top_k, vocab_size))
            log.info("top_k %d exceeds the vocabulary (%d tokens): clamped to %d (keeps every "
                     "token)", top_k, vocab_size, vocab_size)  # fmt: skip
        return vocab_size
    return top_k


def check_class_labels(labels: Tensor | list[int] | tuple[int, ...], num_classes: int) -> None:
    """Every label must be a class id 0 <= c < num_classes. ``num_classes`` itself is the
    model's null (unconditional) class, which sampling must never be asked for directly."""
    t = torch.as_tensor(labels)
    if t.numel() == 0:
        raise ValueError("no class labels given")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"class labels must be integers, got dtype {t.dtype}")
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) or t.device.type == "meta":
        return  # shape-only runs (the profilers' FakeTensorMode counts) carry no values
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"class {bad} is out of range: the model has classes 0..{num_classes - 1} "
            f"({num_classes} is its null class, used only for guidance)"
        )


def top_k_top_p_filter_(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Filter logits in place with the official semantics (0 means off for both).

    top-k keeps every logit >= the k-th largest (ties kept); top-p runs after top-k: sort
    ascending, cumulative softmax, drop entries whose cumulative mass is <= 1 − p, always
    keeping the largest.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth = logits_BlV.topk(min(top_k, V), dim=-1, largest=True, sorted=False)[0]
        logits_BlV.masked_fill_(logits_BlV < kth.amin(dim=-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits_BlV


def gumbel_softmax(logits: Tensor, tau: float, rng: torch.Generator | None) -> Tensor:
    """Soft Gumbel-softmax with noise from ``rng`` (``more_smooth`` pictures, docs/var.md §3)."""
    gumbels = -torch.empty_like(logits).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(-1)


def make_generator(device: torch.device, g_seed: int | None) -> torch.Generator | None:
    if g_seed is None:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(g_seed)
    return rng


def guidance_weight(guidance: float, si: int, num_scales: int) -> float:
    """t = guidance · si / (S − 1): 0 at the first scale, ``guidance`` at the last (linear ramp)."""
    return guidance * si / (num_scales - 1) if num_scales > 1 else guidance


@torch.no_grad()
def decode_fhat(vae: torch.nn.Module, fhat_BCvNN: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] of the cumulative f̂ (``VQVAE.fhat_to_img``, rescaled)."""
    return vae.fhat_to_img(fhat_BCvNN).add_(1).mul_(0.5)


@torch.no_grad()
def sample_scales(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    label_B: Tensor,
    step: ScaleStep,
    *,
    guided: bool,
    guidance: float,
    top_k: int,
    top_p: float,
    g_seed: int | None,
    more_smooth: bool,
    record_logits: bool,
) -> SampleOutput:
    """The next-scale loop. ``model`` is a ``ScaleARTransformer``; ``vae`` a ``VQVAE``."""
    top_k = check_sampling_settings(guidance, top_k, top_p, model.V)
    check_class_labels(label_B, model.num_classes)
    B = label_B.shape[0]
    S = len(model.patch_nums)
    device = label_B.device
    rng = make_generator(device, g_seed)

    rows = torch.cat((label_B, torch.full_like(label_B, model.num_classes))) if guided else label_B
    cond_BD = model.class_emb(rows)
    lvl_pos = model.lvl_pos()
    x_BlC = model.embed_scale(0, cond_BD, None, lvl_pos)

    N = model.patch_nums[-1]
    fhat = cond_BD.new_zeros(B, model.Cvae, N, N)
    idx_per_scale: list[Tensor] = []
    logits_per_scale: list[Tensor] = []
    for si, pn in enumerate(model.patch_nums):
        ratio = si / (S - 1) if S > 1 else 1.0
        h_BlC = step(si, x_BlC, cond_BD)
        logits_BlV = model.get_logits(h_BlC, cond_BD)
        if guided:
            t = guidance_weight(guidance, si, S)
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        if record_logits:
            logits_per_scale.append(logits_BlV.clone())

        top_k_top_p_filter_(logits_BlV, top_k, top_p)
        probs = logits_BlV.softmax(dim=-1).view(-1, model.V)
        idx_Bl = torch.multinomial(probs, 1, replacement=True, generator=rng).view(B, -1)
        idx_per_scale.append(idx_Bl)
        if more_smooth:  # pictures only: a soft code mixture, sharper at later scales
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h_BlCv = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, rng) @ vae.codebook
            h_BCvpp = h_BlCv.transpose(1, 2).reshape(B, model.Cvae, pn, pn)
        else:
            h_BCvpp = vae.embed(idx_Bl, pn)
        fhat, next_map = vae.next_ar_input(si, fhat, h_BCvpp)
        if si + 1 < S:
            x_BlCv = next_map.view(B, model.Cvae, -1).transpose(1, 2)
            x_BlC = model.embed_scale(si + 1, cond_BD, x_BlCv, lvl_pos)
            if guided:
                x_BlC = x_BlC.repeat(2, 1, 1)

    return SampleOutput(
        idx_Bl=idx_per_scale,
        fhat=fhat,
        img01=None,  # ScaleARTransformer.sample decodes after freeing the step's state
        guided=guided,
        guided_logits=logits_per_scale if record_logits else None,
    )
