"""The measurements behind Table 2's and the ablation's compute columns, built from the
instruments of ``mvar.profiling``; ``repro/rows.py`` turns them into report rows.

What is measured, and how (``method`` in every row, vocabulary in ``repro/report.py``):

* **Attention-block FLOPs** (``counted``): :class:`~mvar.profiling.AttentionCounter` hooked on
  a real model while it samples under ``FakeTensorMode`` (paper size, nothing allocated), and
  the closed form (``analytic``).
* **Full-model FLOPs** (``counted``): :class:`~mvar.profiling.ModelFlopCounter`, every
  matmul/convolution the real sampler dispatches under ``FakeTensorMode``, guidance rows
  included, and the closed form (``analytic``), docs/counting.md §4.
* **KV cache** (``counted``): bytes of the VAR sampler's actual K/V tensors at the end of
  sampling; 0 for MVAR, which has none (docs/mvar.md §1).
* **Peak memory without a GPU** (``estimated``): the live-bytes tracker under
  ``FakeTensorMode``. **On a GPU** (``measured``): torch max-allocated / max-reserved and the
  NVML device peak.
* **Training**: the trainer's own step (``mvar.step.train_step``: parameter groups, clipping)
  over the trainer's chunk schedule (``mvar.schedule``); time per iteration is the mean
  weighted by the schedule (MVAR at 256 px: 8 iterations on scales 0-7, one on 8, one on 9),
  peak memory the max over its chunks.
* **Latency** (``measured``): :func:`~mvar.profiling.time_call`, synchronised, warm-up
  excluded, median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mvar import precision
from mvar.config import ModelConfig, SamplingConfig, get_preset
from mvar.profiling import (
    CUDA_BLOCK_BYTES,
    AttentionCounter,
    AttentionMacs,
    CudaMemory,
    FakeModels,
    LiveBytesTracker,
    ModelFlopCounter,
    ModelMacs,
    Timing,
    build_fake,
    cuda_memory,
    labels_for,
    module_tensors,
    tensor_bytes,
    time_call,
)
from mvar.sampling import SampleOutput
from mvar.schedule import TrainSchedule, scales_label
from mvar.step import (
    DEFAULT_GRAD_CLIP,
    DEFAULT_WEIGHT_DECAY,
    make_optimizer,
    make_scaler,
    train_step,
)

#: The sampling settings the compute columns use: VAR's FID defaults (cfg 1.5, top-k 900,
#: top-p 0.96; docs/var.md §3), from ``mvar.config`` (memory and FLOPs do not depend on them).
FID_SAMPLING = SamplingConfig()


def _config(cfg: ModelConfig | str) -> ModelConfig:
    return get_preset(cfg) if isinstance(cfg, str) else cfg


@dataclass(frozen=True)
class SamplingCount:
    """What one counted sampling run gives: attention MACs per image and KV-cache bytes."""

    macs: AttentionMacs
    kv_cache_bytes: int
    batch: int
    guidance: float
    rows: int  # 2·batch with guidance, batch without


def count_sampling(
    cfg: ModelConfig | str,
    *,
    batch: int = 1,
    guidance: float = FID_SAMPLING.guidance,
    top_k: int = FID_SAMPLING.top_k,
    top_p: float = FID_SAMPLING.top_p,
    models: FakeModels | None = None,
) -> SamplingCount:
    """Run the real sampler (no decode) under ``FakeTensorMode`` (paper sizes in about a
    second) with :class:`AttentionCounter` hooks and read the KV cache bytes off its tensors.
    Guidance runs 2B rows; each call's count is divided by its rows."""
    m = models or build_fake(_config(cfg))
    counter = AttentionCounter(m.model)
    out = _fake_sample(m, counter, batch, guidance, top_k, top_p, decode=False)
    return SamplingCount(
        counter.result(), int(out.kv_cache_bytes), batch, guidance,
        2 * batch if out.guided else batch,
    )  # fmt: skip


def count_model_macs(
    cfg: ModelConfig | str,
    *,
    batch: int = 1,
    guidance: float = FID_SAMPLING.guidance,
    top_k: int = FID_SAMPLING.top_k,
    top_p: float = FID_SAMPLING.top_p,
    decode: bool = True,
    models: FakeModels | None = None,
) -> ModelMacs:
    """Run the real sampler under ``FakeTensorMode`` with :class:`ModelFlopCounter`: the
    multiply-accumulates of every matmul and convolution it dispatches (both halves of a guided
    batch), by transformer / VQ-VAE, per ``batch`` images; the VQ-VAE decode only if
    ``decode`` (docs/counting.md §4)."""
    m = models or build_fake(_config(cfg))
    counter = ModelFlopCounter(m.model, m.vae, images=batch)
    _fake_sample(m, counter, batch, guidance, top_k, top_p, decode=decode)
    return counter.result()


def _fake_sample(m: FakeModels, counter: Any, batch: int, guidance: float, top_k: int,
                 top_p: float, *, decode: bool) -> SampleOutput:  # fmt: skip
    """One real sampling call on the fake models with ``counter`` (a context manager) active
    inside the fake mode, as the counters above need."""
    with m.fake_mode, counter:
        return m.model.sample(m.vae, labels_for(batch), guidance=guidance, top_k=top_k,
                              top_p=top_p, g_seed=0, decode=decode)  # fmt: skip


@dataclass(frozen=True)
class InferenceMemory:
    """Peak bytes of sampling one batch, by phase.

    ``tokens``: token generation (transformer + quantizer, ``decode=False``); ``decode``: VQ-VAE
    decode of the batch's f̂ to images; ``total``: both in one run (sampling with decode). All
    include the resident weights of the transformer and the whole VQ-VAE (``weights``).
    """

    model: str
    batch: int
    tokens: int
    decode: int
    total: int
    weights: int
    kv_cache: int
    method: str  # "estimated" (fake tensors) or "measured" (GPU)
    what: str  # which counter the numbers are (live bytes / max-allocated / ...)


def estimate_inference_memory(
    cfg: ModelConfig | str,
    batch: int,
    *,
    guidance: float = FID_SAMPLING.guidance,
    top_k: int = FID_SAMPLING.top_k,
    top_p: float = FID_SAMPLING.top_p,
    decode: bool = True,
    round_to: int = CUDA_BLOCK_BYTES,
    models: FakeModels | None = None,
    attention: str = "fused",
) -> InferenceMemory:
    """Estimate the sampling peak of a paper-size model under ``FakeTensorMode`` (fp32).

    The transformer and VQ-VAE weights are resident from the start (as when a model is loaded
    on a GPU); the peak then follows every live tensor: KV cache (VAR), activations, logits and
    their top-k/top-p copies, f̂, and in the decode phase the decoder's feature maps.
    ``decode=False`` skips the decode phase (``decode`` is then 0 and ``total == tokens``).
    ``models`` reuses fake models of the same config across calls.

    ``attention="fused"`` lets SDPA pick its fused CPU kernel (no score matrix, like flash /
    memory-efficient attention on a GPU); ``"math"`` forces the math kernel, which materialises
    the (rows, H, l, L) scores and their softmax as a non-fused implementation does. MVAR's
    neighbourhood scales then run as masked full attention (``dense`` backend), an upper bound
    for a real NA kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention not in ("fused", "math"):
        raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
    kernel = sdpa_kernel([SDPBackend.MATH]) if attention == "math" else nullcontext()
    cfg = _config(cfg)
    m = models or build_fake(cfg)
    tracker = LiveBytesTracker(round_to=round_to)
    tracker.track(module_tensors(m.model), "weights")
    tracker.track(module_tensors(m.vae), "vae_weights")
    weights = tracker.current
    with m.fake_mode, tracker, torch.no_grad(), kernel:
        labels = labels_for(batch)
        with tracker.phase("tokens"):
            out = m.model.sample(
                m.vae, labels, guidance=guidance, top_k=top_k, top_p=top_p, g_seed=0, decode=False
            )
        kv = int(out.kv_cache_bytes)
        fhat = out.fhat
        del out  # the token ids stay only as f̂, as in sample(decode=True)
        if decode:
            with tracker.phase("decode"):
                m.vae.fhat_to_img(fhat)  # the whole batch at once
    peak_tokens = tracker.phase_peaks["tokens"]
    peak_decode = tracker.phase_peaks.get("decode", 0)
    return InferenceMemory(
        model=cfg.name, batch=batch, tokens=peak_tokens, decode=peak_decode,
        total=max(peak_tokens, peak_decode), weights=weights, kv_cache=kv,
        method="estimated",
        what=f"peak live tensor bytes under FakeTensorMode, {round_to}-byte blocks, "
        f"{attention} attention",
    )  # fmt: skip


def measure_inference_cuda(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cuda",
    guidance: float = FID_SAMPLING.guidance,
    top_k: int = FID_SAMPLING.top_k,
    top_p: float = FID_SAMPLING.top_p,
    autocast_dtype: torch.dtype | None = None,
    phases: Sequence[str] = ("tokens", "decode", "total"),
) -> dict[str, CudaMemory]:
    """Real peak memory of sampling on a GPU (random weights: memory does not depend on them),
    per phase: ``tokens`` (decode=False), ``decode`` (f̂ → images), ``total`` (decode=True).
    fp32 unless ``autocast_dtype`` is given. One untimed warm-up sampling call comes first."""
    cfg, device = _config(cfg), torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("measure_inference_cuda needs a CUDA device")
    model, vae, labels = _real_models(cfg, batch, device)
    # The sampler's own precision option (mvar.precision: autocast, logits head in fp32); the
    # standalone decode phase runs under the same autocast, as inside sample().
    dtype = precision.check_precision(autocast_dtype or torch.float32, device)
    amp = precision.autocast(dtype, device)
    kw = {"guidance": guidance, "top_k": top_k, "top_p": top_p, "g_seed": 0, "dtype": dtype}
    out: dict[str, CudaMemory] = {}
    with torch.no_grad():
        model.sample(vae, labels, decode=False, **kw)  # warm-up: kernels, workspaces
        torch.cuda.empty_cache()
        if "tokens" in phases or "decode" in phases:
            with cuda_memory(device) as r:
                res = model.sample(vae, labels, decode=False, **kw)
            out["tokens"] = r[0]
            if "decode" in phases:
                with cuda_memory(device) as r, amp:
                    vae.fhat_to_img(res.fhat)
                out["decode"] = r[0]
            del res
            torch.cuda.empty_cache()
        if "total" in phases:
            with cuda_memory(device) as r:
                model.sample(vae, labels, decode=True, **kw)
            out["total"] = r[0]
    return out


def _real_models(
    cfg: ModelConfig, batch: int, device: torch.device
) -> tuple[nn.Module, nn.Module, Tensor]:
    """A randomly initialised transformer and VQ-VAE on ``device`` in eval mode, and labels."""
    from mvar.build import build_model, build_vqvae

    model = build_model(cfg, device=device).eval()
    vae = build_vqvae(cfg.vae, device=device).eval()
    return model, vae, labels_for(batch, device)


def _real_train_setup(
    cfg: ModelConfig, batch: int, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, tuple[Tensor, ...]]:
    """A randomly initialised transformer in train mode, the trainer's AdamW and random inputs."""
    from mvar.build import build_model

    model = build_model(cfg, device=device).train()
    return model, _optimizer(model, None), _train_inputs(cfg, batch, device)


def _optimizer(model: nn.Module, foreach: bool | None) -> torch.optim.Optimizer:
    # The trainer's AdamW and parameter groups (mvar.step); memory does not depend on the lr.
    return make_optimizer(model, lr=1e-4, weight_decay=DEFAULT_WEIGHT_DECAY, foreach=foreach)


def _step(model: nn.Module, opt: torch.optim.Optimizer, inputs: tuple[Tensor, ...],
          scales: Sequence[int], amp_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """The trainer's iteration (``mvar.step.train_step``) with its gradient clipping."""
    labels, x_BLCv, targets = inputs
    scaler = make_scaler(amp_dtype, x_BLCv.device) if amp_dtype is not None else None
    return train_step(model, opt, labels, x_BLCv, targets, scales, grad_clip=DEFAULT_GRAD_CLIP,
                      amp_dtype=amp_dtype, scaler=scaler)  # fmt: skip


def _train_inputs(cfg: ModelConfig, batch: int, device: torch.device | str) -> tuple[Tensor, ...]:
    labels = labels_for(batch, device)
    x_BLCv = torch.randn(batch, cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.Cvae, device=device)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    return labels, x_BLCv, targets


def train_schedule(cfg: ModelConfig | str) -> TrainSchedule:
    """The trainer's chunk schedule at its official ``ratio_k`` (``mvar.schedule``)."""
    return TrainSchedule.for_config(_config(cfg))


@dataclass(frozen=True)
class TrainMemory:
    """Peak bytes of one training iteration per chunk (``chunks[name]``) and their max, the
    peak of a training run whatever the schedule's weights.

    Each chunk's peak includes weights, gradients and AdamW state (``exp_avg``,
    ``exp_avg_sq``) present at that time, activations kept for backward and the optimizer
    step's temporaries. ``optimizer_state`` and ``grads`` are the bytes of those tensors.
    """

    model: str
    batch: int
    chunks: dict[str, int]
    peak: int
    weights: int
    grads: int
    optimizer_state: int
    method: str
    what: str
    schedule: str = ""


def estimate_train_memory(
    cfg: ModelConfig | str,
    batch: int,
    *,
    round_to: int = CUDA_BLOCK_BYTES,
    foreach: bool = True,
) -> TrainMemory:
    """Estimate the fp32 training-step peak of a paper-size model under ``FakeTensorMode``.

    The optimizer state exists from the start (a steady-state iteration, not the first), and
    AdamW uses the multi-tensor (``foreach``) path that is PyTorch's CUDA default. Every chunk
    of the trainer's schedule is one iteration of the trainer's step; its peak is recorded
    separately.
    """
    cfg = _config(cfg)
    schedule = train_schedule(cfg)
    m = build_fake(cfg, train=True)
    model = m.model
    with m.fake_mode:
        opt = _optimizer(model, foreach)
        inputs = _train_inputs(cfg, batch, "cpu")
        # Warm the optimizer state (exp_avg, exp_avg_sq, step) with one step on zero grads.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
    tracker = LiveBytesTracker(round_to=round_to)
    tracker.track(module_tensors(model), "weights")
    tracker.track(state, "optimizer_state")
    tracker.track(inputs, "inputs")
    weights = tensor_bytes(module_tensors(model))
    chunks: dict[str, int] = {}
    with m.fake_mode, tracker:
        for scales in schedule.chunks:
            name = scales_label(scales)
            with tracker.phase(name):
                _step(model, opt, inputs, scales)
            chunks[name] = tracker.phase_peaks[name]
    grads = tensor_bytes(p for p in model.parameters() if p.requires_grad)  # one grad per param
    return TrainMemory(
        model=cfg.name, batch=batch, chunks=chunks, peak=max(chunks.values()), weights=weights,
        grads=grads, optimizer_state=tensor_bytes(state), method="estimated",
        what=f"peak live tensor bytes under FakeTensorMode, {round_to}-byte blocks, fp32, AdamW "
        f"foreach={foreach}", schedule=schedule.describe(),
    )  # fmt: skip


@dataclass(frozen=True)
class TrainTiming:
    """Seconds per iteration for each chunk and ``mean_s``, their mean weighted by the
    schedule (MVAR at 256 px: (8·t[0-7] + t[8] + t[9]) / 10), what an iteration costs on
    average over a training run."""

    model: str
    batch: int
    chunks: dict[str, Timing]
    mean_s: float
    device: str
    schedule: str = ""


def time_train_step(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> TrainTiming:
    """Real timing of the trainer's iteration (random weights and inputs) on ``device``.

    Per chunk of the schedule: warm-up iterations untimed, then the median of ``repeats``;
    ``mean_s`` weights each chunk by its iterations per cycle."""
    cfg, device = _config(cfg), torch.device(device)
    schedule = train_schedule(cfg)
    model, opt, inputs = _real_train_setup(cfg, batch, device)
    out: dict[str, Timing] = {}
    for scales in schedule.chunks:
        out[scales_label(scales)] = time_call(
            lambda s=scales: _step(model, opt, inputs, s, autocast_dtype),
            device=device, warmup=warmup, repeats=repeats,
        )  # fmt: skip
    mean = schedule.weighted_mean({c: out[scales_label(c)].median_s for c in schedule.chunks})
    return TrainTiming(cfg.name, batch, out, mean, str(device), schedule.describe())


def measure_train_memory_cuda(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cuda",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, CudaMemory | str]:
    """Real training-step peak per chunk on a GPU (after one warm-up iteration of every chunk,
    so AdamW state exists). A chunk that runs out of memory is reported as ``"oom"``."""
    cfg, device = _config(cfg), torch.device(device)
    schedule = train_schedule(cfg)
    out: dict[str, CudaMemory | str] = {}
    try:
        model, opt, inputs = _real_train_setup(cfg, batch, device)
    except torch.cuda.OutOfMemoryError:
        return {scales_label(s): "oom" for s in schedule.chunks}
    for scales in schedule.chunks:
        name = scales_label(scales)
        try:
            _step(model, opt, inputs, scales, autocast_dtype)  # warm-up
            with cuda_memory(device) as r:
                _step(model, opt, inputs, scales, autocast_dtype)
            out[name] = r[0]
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            out[name] = "oom"
    return out


def time_sampling(
    cfg: ModelConfig | str,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    guidance: float = FID_SAMPLING.guidance,
    top_k: int = FID_SAMPLING.top_k,
    top_p: float = FID_SAMPLING.top_p,
    decode: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> Timing:
    """Real latency of sampling one batch (random weights) on ``device``; token generation
    only unless ``decode``."""
    cfg, device = _config(cfg), torch.device(device)
    model, vae, labels = _real_models(cfg, batch, device)
    dtype = precision.check_precision(autocast_dtype or torch.float32, device)

    def run() -> None:
        with torch.no_grad():
            model.sample(vae, labels, guidance=guidance, top_k=top_k, top_p=top_p, g_seed=0,
                         decode=decode, dtype=dtype)  # fmt: skip

    return time_call(run, device=device, warmup=warmup, repeats=repeats)


def gflops_close(a: float, b: float, tol: float = 0.01) -> bool:
    """Paper GFLOPs cells are rounded (two differ from the exact count by one unit in the last
    digit, docs/counting.md §3), so compare within 0.01."""
    return math.isclose(a, b, abs_tol=tol + 1e-9)
