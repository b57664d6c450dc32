"""Row builders shared by ``repro.table2`` and ``repro.ablation``: the run options, the
compute / GPU / tiny-preset / quality rows of one model, the markdown sections and the notes on
what each memory column is. Each ``repro`` module is a thin script over these.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mvar import precision
from mvar import profiling as prof
from mvar.config import SamplingConfig
from repro import compute
from repro.report import Environment, ResultRow, device_name, make_row, not_measured

#: VAR's FID sampling settings (``mvar.config``): what the compute columns sample with.
_FID = SamplingConfig()
FIGURE_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
QUALITY_METRICS: tuple[str, ...] = ("fid", "is", "precision", "recall")
# Tiny CPU stand-ins for the latency columns (same code paths, depth 2, width 128).
TINY_FOR: dict[str, str] = {"var": "var-tiny", "mvar": "mvar-tiny"}
NEEDS_GPU = "needs a CUDA GPU"
# Units of the metrics this module adds beyond the paper's columns.
UNITS: dict[str, str] = {
    "full_gflops_per_image": "GFLOPs (1 MAC = 1 FLOP)",
    "vae_decode_gflops_per_image": "GFLOPs (1 MAC = 1 FLOP)",
    "inference_memory_decode": "MiB",
    "inference_memory_total": "MiB",
    "inference_memory_math_attn": "MiB",
    "inference_memory_reserved": "MiB",
    "inference_memory_nvml": "MiB",
    "resident_weights": "MiB",
    "train_memory_reserved": "MiB",
    "sample_time_tokens": "s",
    "sample_speedup": "x",
}


@dataclass(frozen=True)
class Options:
    """What a run measures. Defaults reproduce the paper's setting (batch 32, fp32, CFG 1.5)."""

    out: Path = Path("reports")
    batch: int = 32
    guidance: float = _FID.guidance  # VAR's FID setting; memory and FLOPs do not depend on it
    top_k: int = _FID.top_k
    top_p: float = _FID.top_p
    tiny_batch: int = 8
    repeats: int = 3
    figure: bool = True
    figure_batches: tuple[int, ...] = FIGURE_BATCHES
    train: bool = True
    autocast: str | None = None  # mvar.precision name (bf16; fp16 GPU only); None = fp32
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return precision.torch_dtype(self.autocast) if self.autocast else None

    @property
    def dtype_label(self) -> str:
        return precision.describe(self.autocast or "fp32")


def _unit(metric: str) -> str | None:
    if metric.startswith("train_memory_chunk_"):
        return "MiB"
    return UNITS.get(metric)


@functools.cache
def fake_device() -> str:
    """The device column of a fake-tensor count or estimate: this machine's CPU (fake tensors
    are CPU tensors even on a GPU machine), nothing allocated."""
    return f"{device_name('cpu')} [FakeTensorMode, nothing allocated]"


def row(
    env: Environment, table: str, model: str, metric: str, value: float | None, **kw
) -> ResultRow:
    kw.setdefault("unit", _unit(metric))
    return make_row(env, table, model, metric, value, **kw)


# --- cached paper-size estimates (each one builds fake models; reuse within a run) -----------
@functools.cache
def _fake(preset: str) -> prof.FakeModels:
    return prof.build_fake(preset)


@functools.cache
def inference_estimate(
    preset: str, batch: int, decode: bool, guidance: float = _FID.guidance, attention: str = "fused"
) -> compute.InferenceMemory:
    return compute.estimate_inference_memory(
        preset, batch, guidance=guidance, decode=decode, models=_fake(preset), attention=attention
    )


@functools.cache
def sampling_count(preset: str, batch: int, guidance: float = _FID.guidance) -> compute.SamplingCount:
    return compute.count_sampling(preset, batch=batch, guidance=guidance, models=_fake(preset))


@functools.cache
def model_macs_count(preset: str, batch: int, guidance: float = _FID.guidance) -> prof.ModelMacs:
    return compute.count_model_macs(preset, batch=batch, guidance=guidance, models=_fake(preset))


@functools.cache
def train_estimate(preset: str, batch: int) -> compute.TrainMemory:
    return compute.estimate_train_memory(preset, batch)


def _guided(preset: str, guidance: float) -> bool:
    """Whether the sampler runs the unconditional half (the model class's rule at cfg 1)."""
    return _fake(preset).model.GUIDANCE_ONE_RUNS_UNCONDITIONAL or guidance != 1.0


# --- rows ----------------------------------------------------------------------------------
def compute_rows(
    env: Environment, table: str, model: str, preset: str, opts: Options
) -> list[ResultRow]:
    """FLOPs, KV cache and memory-estimate rows of one model (all device-independent)."""
    B = opts.batch
    rows: list[ResultRow] = []
    closed = replace(env, device="none (closed form)")
    fake_dev = fake_device()

    count = sampling_count(preset, B, opts.guidance)
    rows.append(row(env, table, model, "attn_gflops", count.macs.gflops, method="counted",
                    batch=B, device=fake_dev))  # fmt: skip
    rows.append(row(closed, table, model, "attn_gflops",
                    prof.analytic_attention_macs(preset).gflops, method="analytic"))  # fmt: skip
    full = model_macs_count(preset, B, opts.guidance)
    rows.append(row(env, table, model, "full_gflops_per_image", full.full_gflops_per_image,
                    method="counted", batch=B, device=fake_dev))  # fmt: skip
    rows.append(row(closed, table, model, "full_gflops_per_image",
                    prof.analytic_sampling_macs(preset, guided=_guided(preset, opts.guidance))
                    / 1e9, method="analytic", batch=B))  # fmt: skip
    rows.append(row(env, table, model, "vae_decode_gflops_per_image", full.vae_gflops_per_image,
                    method="counted", batch=B, device=fake_dev))  # fmt: skip
    rows.append(row(env, table, model, "kv_cache", prof.mib(count.kv_cache_bytes),
                    method="counted", batch=B, device=fake_dev))  # fmt: skip
    rows.append(row(closed, table, model, "kv_cache",
                    prof.mib(prof.analytic_kv_cache_bytes(preset, B)), method="analytic",
                    batch=B))  # fmt: skip

    mem = inference_estimate(preset, B, True, opts.guidance)
    for metric, v in (
        ("inference_memory", mem.tokens),
        ("inference_memory_decode", mem.decode),
        ("inference_memory_total", mem.total),
        ("resident_weights", mem.weights),
        (
            "inference_memory_math_attn",
            inference_estimate(preset, B, False, opts.guidance, "math").tokens,
        ),
    ):
        rows.append(row(env, table, model, metric, prof.mib(v), method="estimated", batch=B,
                        device=fake_dev))  # fmt: skip

    if opts.train:
        tm = train_estimate(preset, B)
        rows.append(row(env, table, model, "train_memory", prof.mib(tm.peak), method="estimated",
                        batch=B, device=fake_dev))  # fmt: skip
        for name, v in tm.chunks.items():
            rows.append(row(env, table, model, f"train_memory_chunk_{name}", prof.mib(v),
                            method="estimated", batch=B, device=fake_dev))  # fmt: skip
    return rows


def ratio_rows(
    env: Environment, table: str, pairs: Sequence[tuple[str, str, str, str]], opts: Options
) -> list[ResultRow]:
    """VAR/MVAR inference-memory ratio (estimated) for (var model, var preset, mvar model, mvar
    preset) pairs, on the MVAR row as the paper prints it."""
    out = []
    fake_dev = fake_device()
    for _vm, vp, mm, mp in pairs:
        a = inference_estimate(vp, opts.batch, True, opts.guidance).tokens
        b = inference_estimate(mp, opts.batch, True, opts.guidance).tokens
        out.append(row(env, table, mm, "inference_memory_ratio", a / b, method="estimated",
                       batch=opts.batch, device=fake_dev))  # fmt: skip
    return out


def gpu_rows(
    env: Environment, table: str, model: str, preset: str, opts: Options
) -> list[ResultRow]:
    """Real time and memory at paper size on the GPU (random weights; neither depends on
    them): torch max-allocated (compared with the paper), max-reserved and the NVML device
    peak. A step that runs out of memory gives ``status="oom"`` rows. Without a GPU: rows that
    say why."""
    B = opts.batch
    sample_metrics = ["sample_time", "sample_time_tokens"]
    mem_metrics = [
        "inference_memory", "inference_memory_reserved", "inference_memory_nvml",
        "inference_memory_decode", "inference_memory_total",
    ]  # fmt: skip
    train_metrics = ["train_step_time", "train_memory", "train_memory_reserved"]
    if not opts.train:
        train_metrics = []
    if not opts.on_gpu:
        reason = f"{NEEDS_GPU} (this run: {torch.device(opts.device).type})"
        return [
            not_measured(env, table, model, m, reason, batch=B, unit=_unit(m))
            for m in sample_metrics + mem_metrics + train_metrics
        ]
    ad = opts.autocast_dtype
    kw = {"guidance": opts.guidance, "top_k": opts.top_k, "top_p": opts.top_p}

    def oom(metrics: Sequence[str]) -> list[ResultRow]:
        torch.cuda.empty_cache()
        return [
            row(env, table, model, m, None, method="none", status="oom", batch=B) for m in metrics
        ]

    def measured(metric: str, value: float) -> ResultRow:
        return row(env, table, model, metric, value, method="measured", batch=B)

    rows: list[ResultRow] = []
    try:
        full = compute.time_sampling(preset, B, device=opts.device, decode=True,
                                  repeats=opts.repeats, autocast_dtype=ad, **kw)  # fmt: skip
        tok = compute.time_sampling(preset, B, device=opts.device, decode=False,
                                 repeats=opts.repeats, autocast_dtype=ad, **kw)  # fmt: skip
        rows += [measured("sample_time", full.median_s),
                 measured("sample_time_tokens", tok.median_s)]  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        rows += oom(sample_metrics)
    torch.cuda.empty_cache()
    try:
        mem = compute.measure_inference_cuda(preset, B, device=opts.device, autocast_dtype=ad, **kw)
        t = mem["tokens"]
        rows += [
            measured("inference_memory", prof.mib(t.max_allocated)),
            measured("inference_memory_reserved", prof.mib(t.max_reserved)),
            measured("inference_memory_decode", prof.mib(mem["decode"].max_allocated)),
            measured("inference_memory_total", prof.mib(mem["total"].max_allocated)),
        ]
        if t.nvml.ok and t.nvml.peak_bytes is not None:
            rows.append(measured("inference_memory_nvml", prof.mib(t.nvml.peak_bytes)))
        else:
            reason = t.nvml.status.removeprefix("not measured: ")
            rows.append(not_measured(env, table, model, "inference_memory_nvml", reason,
                                     batch=B, unit="MiB"))  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        rows += oom(mem_metrics)
    torch.cuda.empty_cache()
    if opts.train:
        tmem = compute.measure_train_memory_cuda(preset, B, device=opts.device, autocast_dtype=ad)
        peaks = [v for v in tmem.values() if isinstance(v, prof.CudaMemory)]
        if len(peaks) < len(tmem):
            rows += oom(train_metrics)
        else:
            rows += [
                measured("train_memory", prof.mib(max(p.max_allocated for p in peaks))),
                measured("train_memory_reserved", prof.mib(max(p.max_reserved for p in peaks))),
            ]
            torch.cuda.empty_cache()
            try:
                tt = compute.time_train_step(preset, B, device=opts.device, repeats=opts.repeats,
                                          autocast_dtype=ad)  # fmt: skip
                rows.append(measured("train_step_time", tt.mean_s))
            except torch.cuda.OutOfMemoryError:
                rows += oom(["train_step_time"])
        torch.cuda.empty_cache()
    return rows


def tiny_rows(
    env: Environment, table: str, presets: Sequence[str], opts: Options
) -> list[ResultRow]:
    """Measured latency on this device at the tiny presets (``var-tiny``: depth 2, width 128,
    vocabulary 512, 256 px geometry): the same sampler (token generation, top-k 100) and
    training step at a size that runs in seconds on a CPU. Not comparable to the paper's cells
    (other model size). Speed-ups are relative to the first preset."""
    B = opts.tiny_batch
    rows = []
    times: dict[str, tuple[float, float]] = {}
    for preset in presets:
        torch.manual_seed(0)
        # Token generation only: the tiny VQ-VAE still decodes at 256 px, which would dominate
        # (and is the same network for every variant).
        st = compute.time_sampling(preset, B, device=opts.device, guidance=opts.guidance,
                                top_k=min(opts.top_k, 100), top_p=opts.top_p, decode=False,
                                repeats=opts.repeats, autocast_dtype=opts.autocast_dtype)  # fmt: skip
        rows.append(row(env, table, preset, "sample_time_tokens", st.median_s, method="measured",
                        batch=B))  # fmt: skip
        tr = compute.time_train_step(preset, B, device=opts.device, repeats=opts.repeats,
                                     autocast_dtype=opts.autocast_dtype)  # fmt: skip
        rows.append(
            row(env, table, preset, "train_step_time", tr.mean_s, method="measured", batch=B)
        )
        times[preset] = (st.median_s, tr.mean_s)
    base = presets[0]
    for preset in presets[1:]:
        rows.append(row(env, table, preset, "sample_speedup", times[base][0] / times[preset][0],
                        method="measured", batch=B))  # fmt: skip
        rows.append(row(env, table, preset, "train_speedup", times[base][1] / times[preset][1],
                        method="measured", batch=B))  # fmt: skip
    return rows


def cpu_load() -> str:
    """A note on how busy the machine was when the tiny presets were timed."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "CPU load average when timing: unknown."
    return (
        f"CPU load average when timing the tiny presets: {one:.1f} (1 min), {five:.1f} (5 min) "
        f"on {os.cpu_count()} cores; CPU timings on a shared machine are noisy."
    )


def quality_rows(
    env: Environment, table: str, model: str, needs: str, batch: int | None
) -> list[ResultRow]:
    return [not_measured(env, table, model, m, needs, batch=batch) for m in QUALITY_METRICS]


def report_sections(
    rows: Sequence[ResultRow], table: str
) -> list[tuple[str, list[str], list[str]]]:
    """The markdown sections shared by Table 2 and the ablation."""
    chunks = sorted({r.metric for r in rows if r.metric.startswith("train_memory_chunk_")})
    return [
        ("Attention GFLOPs and KV cache", ["attn_gflops", "kv_cache"], [table]),
        ("Full-model GMACs per image (not a paper column)",
         ["full_gflops_per_image", "vae_decode_gflops_per_image"], [table]),
        ("Inference memory (MiB)", ["inference_memory", "inference_memory_ratio",
                                    "inference_memory_math_attn", "inference_memory_decode",
                                    "inference_memory_total", "resident_weights",
                                    "inference_memory_reserved", "inference_memory_nvml"],
         [table]),
        ("Training memory (MiB)", ["train_memory", *chunks, "train_memory_reserved"], [table]),
        ("Time (s) and speed-ups", ["sample_time", "sample_time_tokens", "train_step_time",
                                    "sample_speedup", "train_speedup"], [table]),
        ("Quality (needs checkpoints)", list(QUALITY_METRICS), [table]),
    ]  # fmt: skip


MEMORY_NOTES: tuple[str, ...] = (
    (
        "`inference_memory` is the **token-generation phase** (transformer + quantizer, "
        "`decode=False`); `inference_memory_decode` is the VQ-VAE decode of the whole batch alone "
        "and `inference_memory_total` both in one run. Decoding 32 images at 256 px needs GBs by "
        "itself (decoder feature maps of 160 channels at 256x256), more than MVAR's 3846 MB, so "
        "the paper's Memory column must exclude or chunk the decode: it is compared with the "
        "token-generation phase."
    ),
    (
        "`estimated` memory = peak of live tensor bytes under FakeTensorMode at paper size, fp32, "
        "each tensor rounded to 512-byte CUDA blocks (the analogue of torch's max-allocated). It "
        "includes the resident weights of the transformer and the whole VQ-VAE (`resident_weights`), "
        "the KV cache (VAR), activations, logits and their top-k/top-p copies; it excludes "
        "allocator caching/fragmentation (max-reserved), the CUDA context, kernel workspaces and "
        "the official code's own temporaries. Attention runs as SDPA (no score matrix), MVAR's "
        "neighbourhood attention through the `dense` backend (SDPA with a 0/1 mask). "
        "`inference_memory_math_attn` is the same estimate with SDPA forced to its math kernel, "
        "which materialises the attention scores and their softmax as a non-fused implementation "
        "does (for MVAR's neighbourhood scales: masked full attention, an upper bound)."
    ),
    (
        "`train_memory` (estimated) = max over the schedule's chunks of the peak of the trainer's "
        "own iteration (mvar.step: parameter groups, gradient clipping) with weights, grads, "
        "AdamW state (exp_avg, exp_avg_sq; steady state) and activations, fp32 with no autocast; "
        "VAR runs the full 680-token sequence, MVAR the chunks 0-7 / 8 / 9 of the official "
        "schedule (8 : 1 : 1 iterations, docs/mvar.md §3), listed as `train_memory_chunk_*`. "
        "`train_step_time` is the mean per iteration weighted by that schedule. The paper trained "
        "with fp16 autocast, so its cells are not the same setting."
    ),
    (
        "Time columns are `measured` only on a GPU (synchronised, warm-up excluded, median). On a "
        "CPU run the paper-size time cells are status rows and `var-tiny` / `mvar-tiny` rows give "
        "the CPU latency of the same code at depth 2, width 128 (not comparable to the paper)."
    ),
    (
        "GFLOPs are multiply-accumulates per image in the attention blocks (qkv projection + q·kᵀ + "
        "attention·v), conditional branch only: `counted` by hooks on the real model during CFG "
        "sampling (each call divided by its 2B rows), `analytic` from the config. The paper prints "
        "81.52 and 37.84 where the exact counts are 81.512 and 37.845 (docs/counting.md §3)."
    ),
    (
        "`full_gflops_per_image` is a separate metric, not a paper column: multiply-accumulates "
        "(1 MAC = 1 FLOP, the attention column's unit) of every matmul and linear layer of the "
        "transformer per generated image as the sampler runs it -- qkv, output projection, MLP, "
        "AdaLN (once per scale), word_embed, head and q·kᵀ/attention·v over the allowed pairs -- "
        "with **both** halves of the CFG batch (`counted` by a dispatch-level counter on the real "
        "sampler under FakeTensorMode, `analytic` from docs/counting.md §4). "
        "`vae_decode_gflops_per_image` is the VQ-VAE's part of the same run: the quantizer's φ "
        "convolutions while sampling and the decoder (counted only)."
    ),
)


def parse_options(argv: Sequence[str] | None, description: str) -> Options:
    """The command line of ``repro.table2`` and ``repro.ablation``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    p.add_argument("--batch", type=int, default=32, help="batch of the paper-size cells")
    p.add_argument("--tiny-batch", type=int, default=8, help="batch of the tiny CPU latency rows")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--no-figure", action="store_true", help="skip memory_vs_batch")
    p.add_argument("--no-train", action="store_true", help="skip the training columns")
    p.add_argument("--autocast", choices=["bf16", "fp16", "bfloat16", "float16"], default=None,
                   help="autocast precision (mvar.precision; default: fp32, autocast off); fp16 "
                   "on GPUs only; recorded in every row's dtype column")  # fmt: skip
    p.add_argument("--device", default=Options.device, help="cuda or cpu (default: %(default)s)")
    a = p.parse_args(argv)
    if a.autocast is not None:
        try:  # fp16 on a CPU: one line before any work
            a.autocast = precision.check_precision(a.autocast, a.device)
        except ValueError as e:
            p.error(str(e))
    return Options(
        out=a.out, batch=a.batch, tiny_batch=a.tiny_batch, repeats=a.repeats,
        figure=not a.no_figure, train=not a.no_train, autocast=a.autocast, device=a.device,
    )  # fmt: skip


