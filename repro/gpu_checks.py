"""The checks of ``python -m repro.gpu_check``: everything in this project that needs a GPU, as
a plan of :class:`~repro.checkrun.Check` s with their rows and time estimates.

Kinds of check (rows: ``table``/``model``/``metric``):

* ``kernel_tests``: ``tests/test_attention_gpu.py`` (the ``cuda`` backend forward and
  backward in fp32/fp16/bf16 on pinned awkward shapes, random problems and MVAR's full-size
  workloads, the stream launch, determinism; ``dense`` and compiled ``flex`` on CUDA) and the
  PTX test, run by pytest in a subprocess with ``MVAR_REQUIRE_CUDA_BACKEND=1``. Oracle and
  tolerances are the CPU suite's (the fp64 reference, ``mvar.attention.TOLERANCES``). Rows
  ``gpu_check/na2d/kernel_tests_{passed,failed,skipped}``; any failure is a ``fail:`` row.
* ``parity_<tiny preset>``: the same random-init tiny model on the GPU and on the CPU.
  Teacher forcing on random tokens must agree within :data:`TEACHER_FORCING_TOL`; the GPU
  sampler's guided logits (CFG mix, before top-k/top-p) must agree with CPU teacher forcing on
  the tokens the GPU sampled within :data:`SAMPLER_TOL` (TF32 off while checking). Tokens
  are not compared for equality (CUDA and CPU generators differ); their agreement with a CPU
  sampling run is recorded for information.
* ``na2d_bench_B<B>_<n>x<n>``: median time (ms) of ``cuda``, ``dense`` SDPA + mask,
  compiled ``flex`` and, when installed, ``natten`` on Table 2's workloads (16 heads, D = 64,
  k = 7, fp32), ``fwd`` under no_grad and ``fwd_bwd``; rows ``na2d_bench/<backend>/<pass>_<n>x<n>``.
* ``table2_sample_<dtype>_d<depth>`` / ``table2_train_<dtype>_d<depth>``: Table 2's time and
  memory columns for VAR and MVAR at batch 32 with random weights (neither depends on them),
  fp32 and the official samplers' / trainer's fp16 autocast: latency with and without decode,
  peak memory by phase with torch's max-allocated (the paper's column), max-reserved and the
  NVML device peak; the trainer's step over each model's chunk schedule (``mvar.schedule``),
  time weighted by the schedule and memory per chunk. Each row's ``device`` names the
  neighbourhood-attention backend(s) that ran (``[na2d: cuda]``; VAR: ``[na2d: none]``).

Order (:func:`build_plan`): by value per second of device time. Correctness first (the CUDA
kernel has never run on a device; a wrong kernel makes every later number moot), then the
cheap cells of Table 2's headline (d16 sampling: the memory ratio and latency), the kernel
benchmark at Table 2's workload, then the same cells in fp16, then training and larger depths,
slowest last. Estimates are for one H100 and are guesses until the first run; every run
records estimate and actual per check (``gpu_check.json``) to recalibrate them. Tolerances
and order are explained for users in ``docs/gpu_check.md`` §3-4.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import logging
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mvar import profiling as prof
from mvar.config import get_preset
from mvar.schedule import TrainSchedule, scales_label
from repro import compute
from repro.checkrun import (
    ERROR_PREFIX,
    FAIL_PREFIX,
    OOM,
    Check,
    Context,
    Emit,
    Planned,
    is_oom,
)
from repro.report import ResultRow

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_TABLE = "gpu_check"
BENCH_TABLE = "na2d_bench"
TABLE2 = "table2"
DEPTHS: tuple[int, ...] = (16, 20, 24)
#: Autocast settings of the Table 2 cells: fp32 (autocast off) and the official samplers' and
#: trainer's fp16 autocast (docs/var.md §3-4). Label = the rows' dtype column (repro.rows).
AUTOCASTS: dict[str, torch.dtype | None] = {"float32": None, "float32+autocast(float16)": torch.float16}
KERNEL_TEST_FILES: tuple[str, ...] = ("tests/test_attention_gpu.py", "tests/test_attention_cuda_ptx.py")


@dataclass(frozen=True)
class Tol:
    """``|got - want| <= atol + rtol * |want|`` elementwise."""

    atol: float
    rtol: float

    def ok(self, got: torch.Tensor, want: torch.Tensor) -> bool:
        return bool(((got - want).abs() <= self.atol + self.rtol * want.abs()).all())


# fp32 on both sides with TF32 off: only the order of summation differs (cuBLAS vs the CPU's
# BLAS, the cuda NA kernel vs numba), ~1e-6 relative per op through two tiny blocks; a wrong
# kernel is off by O(1). The sampler's path also runs the VQ-VAE's phi convolutions on the
# device to build each next input, so its logits get 10x more room.
TEACHER_FORCING_TOL = Tol(1e-4, 1e-4)
SAMPLER_TOL = Tol(1e-3, 1e-3)


@dataclass(frozen=True)
class PlanOptions:
    """What the plan covers: the Table 2 batch, timing repeats, kernel-test files, the device."""

    batch: int = 32
    repeats: int = 3
    bench_repeats: int = 20
    device: str = "cuda"
    kernel_test_files: tuple[str, ...] = KERNEL_TEST_FILES
    tiny_presets: tuple[str, ...] = ("var-tiny", "mvar-tiny")
    tiny_batch: int = 4


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _p(table: str, model: str, metric: str, unit: str, dtype: str, batch: int | None) -> Planned:
    return Planned(table, model, metric, unit, dtype, batch)


@contextlib.contextmanager
def na_backends_seen() -> Iterator[list[str]]:
    """Yields a list that receives, on exit, the na2d backends called inside (sorted)."""
    from mvar.attention import backends_used, reset_backends_used

    reset_backends_used()
    seen: list[str] = []
    try:
        yield seen
    finally:
        seen.extend(sorted(backends_used()))


def device_with_backends(base: str, backends: Sequence[str]) -> str:
    """The device column of a model measurement: ``cuda: <name> [na2d: cuda]``."""
    return f"{base} [na2d: {', '.join(backends) if backends else 'none'}]"


def free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sub_step(ctx: Context, emit: Emit, planned: Sequence[Planned], need_s: float, what: str,
              body: Callable[[], list[ResultRow]]) -> None:  # fmt: skip
    """Run one measurement of a check: guard its time, emit its rows; an OOM gives ``oom``
    rows for ``planned`` and lets the check go on (the next measurement may fit)."""
    ctx.guard(need_s, what)
    try:
        rows = body()
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        log.warning("%s: out of memory (%s)", what, " ".join(str(exc).split())[:200])
        free_cuda_memory()
        rows = [ctx.row(p, None, method="none", status=OOM) for p in planned]
    for r in rows:
        emit(r)


# ---------------------------------------------------------------------------------------------
# 1. Kernel tests (pytest in a subprocess)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JunitSummary:
    tests: int
    failed: int  # failures + errors
    skipped: int
    failing: tuple[str, ...]  # "<test id>: <first line of the message>"
    passed_ids: tuple[str, ...] = ()  # "<classname>::<name>" of the tests that passed

    @property
    def passed(self) -> int:
        return self.tests - self.failed - self.skipped


def parse_junit(path: Path) -> JunitSummary:
    """Counts and failing tests of a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failing, passed, skipped = [], [], 0
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            failing.append(f"{name}: {msg[0][:200] if msg else '?'}")
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed.append(name)
    return JunitSummary(len(cases), len(failing), skipped, tuple(failing), tuple(passed))


def kernel_tests_check(files: Sequence[str] = KERNEL_TEST_FILES, *, estimate_s: float = 150.0,
                       repo_root: Path = REPO_ROOT, must_pass: str | None = "test_attention_gpu",
                       ) -> Check:  # fmt: skip
    """pytest on ``files`` in a subprocess; any failure, a pytest error, or no passing test
    whose id contains ``must_pass`` (the device tests: if they all skipped, the kernels went
    untested, e.g. CUDA not visible to the subprocess) is a ``fail:`` row."""
    dt = "float32,float16,bfloat16"
    planned = tuple(_p(GPU_TABLE, "na2d", f"kernel_tests_{k}", "tests", dt, None)
                    for k in ("passed", "failed", "skipped"))  # fmt: skip
    p_pass, p_fail, p_skip = planned

    def run(ctx: Context, emit: Emit) -> None:
        missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
        if missing:
            why = f"{FAIL_PREFIX} cannot run the kernel tests: {', '.join(missing)} not installed"
            for p in planned:
                emit(ctx.row(p, None, method="none", status=why))
            return
        out_dir: Path = ctx.extra["out"]
        xml, text = out_dir / "kernel_tests.xml", out_dir / "kernel_tests.log"
        xml.unlink(missing_ok=True)
        # 3x the estimate before calling it a hang; never past the budget.
        timeout = min(3 * estimate_s, ctx.remaining())
        ctx.guard(min(estimate_s, timeout), "kernel tests")
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}"]  # fmt: skip
        env = {**os.environ, "MVAR_REQUIRE_CUDA_BACKEND": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root),
                                                          os.environ.get("PYTHONPATH")]))}  # fmt: skip
        log.info("running %s (log: %s)", " ".join(cmd[2:]), text)
        with text.open("w") as fh:
            try:
                proc = subprocess.run(cmd, cwd=repo_root, env=env, stdout=fh,
                                      stderr=subprocess.STDOUT, timeout=timeout, check=False)  # fmt: skip
                rc: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        tail = text.read_text(errors="replace").splitlines()[-40:]
        log.info("kernel tests output (last lines):\n%s", "\n".join(tail))
        if rc is None:
            if timeout < 3 * estimate_s:  # cut by the budget, not a hang
                from repro.checkrun import TimeLimitReached

                raise TimeLimitReached(f"kernel tests cut at {timeout:.0f} s (budget)")
            why = f"{FAIL_PREFIX} the kernel tests did not finish in {timeout:.0f} s (a hang?)"
            for p in planned:
                emit(ctx.row(p, None, method="none", status=why))
            return
        if not xml.exists():
            why = f"{FAIL_PREFIX} pytest exited {rc} without a report (see kernel_tests.log)"
            for p in planned:
                emit(ctx.row(p, None, method="none", status=why))
            return
        s = parse_junit(xml)
        ctx.details["kernel_tests"] = {"returncode": rc, "tests": s.tests, "passed": s.passed,
                                       "failed": s.failed, "skipped": s.skipped,
                                       "failing": list(s.failing)}  # fmt: skip
        for f in s.failing:
            log.error("kernel test failed: %s", f)
        fail_status = "ok"
        if s.failed:
            fail_status = f"{FAIL_PREFIX} {s.failed} failed: " + "; ".join(s.failing[:3])
        elif rc not in (0,):
            fail_status = f"{FAIL_PREFIX} pytest exited {rc} (see kernel_tests.log)"
        elif s.passed == 0:
            fail_status = f"{FAIL_PREFIX} no kernel test passed (all {s.skipped} skipped)"
        elif must_pass and not any(must_pass in t for t in s.passed_ids):
            fail_status = (f"{FAIL_PREFIX} no test of {must_pass} passed ({s.skipped} skipped; "
                           "see kernel_tests.log for the reasons)")  # fmt: skip
        emit(ctx.row(p_pass, s.passed, method="counted"))
        emit(ctx.row(p_fail, s.failed, method="counted", status=fail_status[:500]))
        emit(ctx.row(p_skip, s.skipped, method="counted"))

    return Check("kernel_tests", "na2d kernels on the device vs the fp64 reference (pytest)",
                 planned, estimate_s, run)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. GPU vs CPU at the tiny presets
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Plain fp32 matmuls and convolutions on the GPU while comparing with the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass(frozen=True)
class ParityResult:
    teacher_forcing_max_abs: float
    teacher_forcing_ok: bool
    sampler_max_abs: float
    sampler_ok: bool
    tokens_agree: float  # fraction of sampled tokens equal to a CPU sampling run's
    backends: tuple[str, ...]  # na2d backends the device model ran


def tiny_parity(preset: str, device: torch.device | str, *, batch: int = 4, seed: int = 0,
                na_backend: str | None = None, perturb: float = 0.0) -> ParityResult:  # fmt: skip
    """The same random-init model on the CPU and on ``device`` (module docstring).

    ``na_backend`` forces the device model's neighbourhood-attention backend (default: what
    ``backend=None`` picks there); ``perturb`` adds that much noise to the device copy's
    weights (the tests use it to check that a wrong model fails)."""
    from mvar.build import build_model, build_vqvae
    from mvar.sampling import guidance_weight

    device = torch.device(device)
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    cpu_model = build_model(cfg)
    # The from-scratch init shrinks every residual branch to 1e-5 (docs/var.md §2); open them
    # up so that attention, and so the NA kernel, visibly shape the logits.
    cpu_model.init_weights(init_adaln_gamma=1.0, init_head=1.0)
    cpu_model.eval()
    cpu_vae = build_vqvae(cfg.vae).eval()
    dev_model = build_model(cfg, device=device, init=False, na_backend=na_backend).eval()
    dev_model.load_state_dict(cpu_model.state_dict())
    if perturb:
        with torch.no_grad():
            for p in dev_model.parameters():
                p.add_(perturb * torch.randn_like(p))
    dev_vae = copy.deepcopy(cpu_vae).to(device).eval()
    labels = torch.arange(batch) % cfg.num_classes
    gen = torch.Generator().manual_seed(seed + 1)
    idx = [torch.randint(cfg.vocab_size, (batch, pn * pn), generator=gen) for pn in cfg.patch_nums]
    with torch.no_grad(), tf32_off(), na_backends_seen() as seen:
        x = cpu_vae.idx_to_teacher_input(idx)
        want = cpu_model(labels, x)
        got = dev_model(labels.to(device), x.to(device)).cpu()
        tf_err = float((got - want).abs().max())
        tf_ok = TEACHER_FORCING_TOL.ok(got, want)

        guidance, top_k, top_p = 1.5, 100, 0.96
        out = dev_model.sample(dev_vae, labels.to(device), guidance=guidance, top_k=top_k,
                               top_p=top_p, g_seed=seed, decode=False, record_logits=True)  # fmt: skip
        tokens = [t.cpu() for t in out.idx_Bl]
        x2 = cpu_vae.idx_to_teacher_input(tokens)
        cond = cpu_model(labels, x2)
        uncond = cpu_model(torch.full_like(labels, cfg.num_classes), x2)
        S = len(cfg.patch_nums)
        s_err, s_ok = 0.0, True
        for si, (bg, ed) in enumerate(cpu_model.begin_ends):
            t = guidance_weight(guidance, si, S) if out.guided else 0.0
            ref = (1 + t) * cond[:, bg:ed] - t * uncond[:, bg:ed] if out.guided else cond[:, bg:ed]
            dev_logits = out.guided_logits[si].cpu()
            s_err = max(s_err, float((dev_logits - ref).abs().max()))
            s_ok &= SAMPLER_TOL.ok(dev_logits, ref)
    cpu_out = cpu_model.sample(cpu_vae, labels, guidance=guidance, top_k=top_k, top_p=top_p,
                               g_seed=seed, decode=False)  # fmt: skip
    same = sum(int((a == b.cpu()).sum()) for a, b in zip(cpu_out.idx_Bl, tokens))
    total = sum(a.numel() for a in tokens)
    return ParityResult(tf_err, tf_ok, s_err, s_ok, same / total, tuple(seen))


def parity_check(preset: str, opts: PlanOptions, *, estimate_s: float = 20.0) -> Check:
    B = opts.tiny_batch
    tf, sm, tok = (_p(GPU_TABLE, preset, m, u, "float32", B) for m, u in
                   (("teacher_forcing_max_abs_diff", "logit"), ("sampler_logits_max_abs_diff", "logit"),
                    ("tokens_agree_fraction", "fraction")))  # fmt: skip

    def run(ctx: Context, emit: Emit) -> None:
        r = tiny_parity(preset, opts.device, batch=B)
        dev = f"{ctx.env.device} vs cpu [na2d: {', '.join(r.backends) or 'none'}]"
        ctx.details[f"parity_{preset}"] = r.__dict__ | {"teacher_forcing_tol": TEACHER_FORCING_TOL.__dict__,
                                                        "sampler_tol": SAMPLER_TOL.__dict__}  # fmt: skip

        def status(ok: bool, tol: Tol) -> str:
            return "ok" if ok else (f"{FAIL_PREFIX} beyond atol {tol.atol:g} + rtol {tol.rtol:g} "
                                    "against the CPU")  # fmt: skip

        emit(ctx.row(tf, r.teacher_forcing_max_abs, device=dev,
                     status=status(r.teacher_forcing_ok, TEACHER_FORCING_TOL)))  # fmt: skip
        emit(ctx.row(sm, r.sampler_max_abs, device=dev, status=status(r.sampler_ok, SAMPLER_TOL)))
        emit(ctx.row(tok, r.tokens_agree, device=dev))

    return Check(f"parity_{preset}", f"{preset}: GPU vs CPU logits (teacher forcing, sampler)",
                 (tf, sm, tok), estimate_s, run)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 3. na2d benchmark
# ---------------------------------------------------------------------------------------------

BENCH_HEADS, BENCH_D, BENCH_K = 16, 64, 7  # MVAR d16: 16 heads of 64, kernel 7 (docs/mvar.md §2)
BENCH_BACKENDS: tuple[str, ...] = ("cuda", "dense", "flex", "natten")
BENCH_PASSES: tuple[str, ...] = ("fwd", "fwd_bwd")


def natten_unavailable_reason() -> str | None:
    if importlib.util.find_spec("natten") is None:
        return "natten is not installed"
    return None


def _bench_runner(backend: str, B: int, n: int, pass_: str, device: torch.device) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    shape = (B, n, n, BENCH_HEADS, BENCH_D) if backend == "natten" else (B, BENCH_HEADS, n, n, BENCH_D)
    q, k, v, g = (torch.randn(shape, generator=gen).to(device) for _ in range(4))
    if backend == "natten":
        import natten

        def attend(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return natten.na2d(a, b, c, kernel_size=BENCH_K, scale=1.0)
    else:
        from mvar.attention import na2d

        def attend(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return na2d(a, b, c, BENCH_K, scale=1.0, backend=backend)

    if pass_ == "fwd":
        def run() -> None:
            with torch.no_grad():
                attend(q, k, v)
        return run
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def run_bwd() -> None:
        torch.autograd.grad(attend(*leaves), leaves, g)
    return run_bwd


def bench_check(B: int, n: int, opts: PlanOptions, *, estimate_s: float = 25.0) -> Check:
    planned = {(b, p): _p(BENCH_TABLE, b, f"{p}_time_{n}x{n}", "ms", "float32", B)
               for b in BENCH_BACKENDS for p in BENCH_PASSES}  # fmt: skip

    def run(ctx: Context, emit: Emit) -> None:
        from mvar.attention import backend_unavailable_reason

        device = torch.device(opts.device)
        medians: dict[tuple[str, str], float] = {}
        for pass_ in BENCH_PASSES:
            for backend in BENCH_BACKENDS:
                p = planned[(backend, pass_)]
                if backend == "natten":
                    reason = natten_unavailable_reason()
                else:
                    reason = backend_unavailable_reason(backend, device, torch.float32,
                                                        requires_grad=pass_ == "fwd_bwd")  # fmt: skip
                if reason is not None:
                    emit(ctx.row(p, None, method="none", status=f"not measured: {reason}"))
                    continue
                # a compile (flex) or JIT (cuda) on first use, then the timed calls
                ctx.guard(estimate_s / 8, f"{backend} {pass_} B={B} {n}x{n}")
                try:
                    t = prof.time_call(_bench_runner(backend, B, n, pass_, device), device=device,
                                       warmup=3, repeats=opts.bench_repeats)  # fmt: skip
                except Exception as exc:  # noqa: BLE001  (one backend failing is a row, not the end)
                    if is_oom(exc):
                        free_cuda_memory()
                        emit(ctx.row(p, None, method="none", status=OOM))
                        continue
                    msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                    log.error("na2d bench %s %s B=%d %dx%d raised %s", backend, pass_, B, n, n, msg)
                    # natten is a third party: its failure is not ours to fail the run on
                    status = f"skipped: natten raised {msg}" if backend == "natten" else f"{ERROR_PREFIX} {msg}"
                    emit(ctx.row(p, None, method="none", status=status))
                    continue
                medians[(backend, pass_)] = t.median_s
                emit(ctx.row(p, t.median_s * 1e3))
        summary = {f"{b} {p}": round(1e3 * s, 4) for (b, p), s in medians.items()}
        ctx.details[f"na2d_bench_B{B}_{n}x{n}"] = {"median_ms": summary}
        for pass_ in BENCH_PASSES:
            dense = medians.get(("dense", pass_))
            if dense:
                ratios = ", ".join(f"{b} {dense / s:.2f}x" for (b, p), s in medians.items() if p == pass_)
                log.info("na2d B=%d %dx%d %s: speed vs dense: %s", B, n, n, pass_, ratios)

    return Check(f"na2d_bench_B{B}_{n}x{n}",
                 f"na2d cuda / dense / flex / natten, B={B}, {BENCH_HEADS} heads, {n}x{n}, k={BENCH_K}",
                 tuple(planned.values()), estimate_s, run)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 4. Table 2 cells
# ---------------------------------------------------------------------------------------------


def table2_models(depth: int) -> tuple[tuple[str, str], ...]:
    """(row name, preset) of the depth's two Table 2 models (repro.table2.TABLE2_MODELS)."""
    return ((f"var-d{depth}", f"var-d{depth}"), (f"mvar-finetune-d{depth}", f"mvar-d{depth}"))


SAMPLE_METRICS: tuple[tuple[str, str], ...] = (
    ("sample_time", "s"), ("sample_time_tokens", "s"),
    ("inference_memory", "MiB"), ("inference_memory_reserved", "MiB"),
    ("inference_memory_nvml", "MiB"), ("inference_memory_decode", "MiB"),
    ("inference_memory_total", "MiB"),
)  # fmt: skip


def _params(preset: str) -> float:
    c = get_preset(preset)
    return 12 * c.depth * c.embed_dim**2  # the blocks' weights, what sets the cost


def estimate_sample_s(preset: str, amp: torch.dtype | None, opts: PlanOptions) -> float:
    """~12 sampling calls (timing with and without decode, memory phases, warm-ups) at ~0.35 s
    per call per 300M parameters in fp32 (the paper's 0.34 s for VAR-d16 on an RTX 4090), fp16
    ~0.6x, plus building the model three times."""
    scale = _params(preset) / 300e6 * (opts.batch / 32)
    per_call = 0.35 * scale * (0.6 if amp is not None else 1.0)
    return 4.0 + (opts.repeats + 1) * 3 * per_call + 3 * (1.0 + 0.5 * scale)


def estimate_train_s(preset: str, amp: torch.dtype | None, opts: PlanOptions) -> float:
    """Per chunk of the schedule 2 memory + 1 + repeats timed steps; a VAR step is 6·P·B·L
    FLOPs at ~40 TFLOP/s in fp32 (~100 with fp16 autocast); MVAR's chunks add up to the same
    tokens. Plus building the model and AdamW twice."""
    cfg = get_preset(preset)
    steps = 2 + 1 + opts.repeats
    flops = 6 * _params(preset) * opts.batch * cfg.seq_len
    rate = 100e12 if amp is not None else 40e12
    return 6.0 + steps * flops / rate * 1.2 + 2 * (1.0 + _params(preset) / 1e9)


def sample_check(model: str, preset: str, dtype_label: str, opts: PlanOptions) -> Check:
    amp = AUTOCASTS[dtype_label]
    B = opts.batch
    P = {m: _p(TABLE2, model, m, u, dtype_label, B) for m, u in SAMPLE_METRICS}
    est = estimate_sample_s(preset, amp, opts)
    kw = {"guidance": compute.FID_SAMPLING.guidance, "top_k": compute.FID_SAMPLING.top_k,
          "top_p": compute.FID_SAMPLING.top_p}  # fmt: skip

    def run(ctx: Context, emit: Emit) -> None:
        device = torch.device(opts.device)
        base = ctx.env.device
        info: dict[str, Any] = {}
        ctx.details[f"{model} sample {dtype_label}"] = info

        def timing() -> list[ResultRow]:
            with na_backends_seen() as seen:
                full = compute.time_sampling(preset, B, device=device, decode=True,
                                             repeats=opts.repeats, autocast_dtype=amp, **kw)  # fmt: skip
                tok = compute.time_sampling(preset, B, device=device, decode=False,
                                            repeats=opts.repeats, autocast_dtype=amp, **kw)  # fmt: skip
            dev = device_with_backends(base, seen)
            info["time_s"] = {"with_decode": list(full.times_s), "tokens": list(tok.times_s)}
            info["na2d_time"] = list(seen)
            return [ctx.row(P["sample_time"], full.median_s, device=dev),
                    ctx.row(P["sample_time_tokens"], tok.median_s, device=dev)]  # fmt: skip

        def memory() -> list[ResultRow]:
            with na_backends_seen() as seen:
                mem = compute.measure_inference_cuda(preset, B, device=device, autocast_dtype=amp, **kw)
            dev = device_with_backends(base, seen)
            t = mem["tokens"]
            info["memory_bytes"] = {ph: {"max_allocated": m.max_allocated, "max_reserved": m.max_reserved,
                                         "nvml_peak": m.nvml.peak_bytes, "nvml_baseline": m.nvml.baseline_bytes,
                                         "nvml_status": m.nvml.status, "nvml_samples": m.nvml.samples}
                                    for ph, m in mem.items()}  # fmt: skip
            info["na2d_memory"] = list(seen)
            rows = [
                ctx.row(P["inference_memory"], prof.mib(t.max_allocated), device=dev),
                ctx.row(P["inference_memory_reserved"], prof.mib(t.max_reserved), device=dev),
                ctx.row(P["inference_memory_decode"], prof.mib(mem["decode"].max_allocated), device=dev),
                ctx.row(P["inference_memory_total"], prof.mib(mem["total"].max_allocated), device=dev),
            ]  # fmt: skip
            if t.nvml.ok and t.nvml.peak_bytes is not None:
                rows.append(ctx.row(P["inference_memory_nvml"], prof.mib(t.nvml.peak_bytes), device=dev))
            else:
                rows.append(ctx.row(P["inference_memory_nvml"], None, method="none",
                                    status=t.nvml.status, device=dev))  # fmt: skip
            return rows

        time_metrics = [P["sample_time"], P["sample_time_tokens"]]
        mem_metrics = [p for m, p in P.items() if m.startswith("inference_memory")]
        _sub_step(ctx, emit, time_metrics, est * 0.6, f"{model} sampling time", timing)
        free_cuda_memory()
        _sub_step(ctx, emit, mem_metrics, est * 0.4, f"{model} sampling memory", memory)

    return Check(f"table2_sample_{_dt_tag(dtype_label)}_{model}",
                 f"{model} sampling, batch {B}, {dtype_label}: time and memory", tuple(P.values()),
                 est, run)  # fmt: skip


def train_planned(model: str, preset: str, dtype_label: str, B: int) -> dict[str, Planned]:
    chunks = [scales_label(c) for c in TrainSchedule.for_config(get_preset(preset)).chunks]
    metrics = [("train_step_time", "s"), ("train_memory", "MiB"), ("train_memory_reserved", "MiB"),
               ("train_memory_nvml", "MiB")]  # fmt: skip
    metrics += [(f"train_step_time_chunk_{c}", "s") for c in chunks]
    metrics += [(f"train_memory_chunk_{c}", "MiB") for c in chunks]
    return {m: _p(TABLE2, model, m, u, dtype_label, B) for m, u in metrics}


def train_check(model: str, preset: str, dtype_label: str, opts: PlanOptions) -> Check:
    amp = AUTOCASTS[dtype_label]
    B = opts.batch
    P = train_planned(model, preset, dtype_label, B)
    schedule = TrainSchedule.for_config(get_preset(preset))
    est = estimate_train_s(preset, amp, opts)

    def run(ctx: Context, emit: Emit) -> None:
        device = torch.device(opts.device)
        base = ctx.env.device
        info: dict[str, Any] = {"schedule": schedule.describe()}
        ctx.details[f"{model} train {dtype_label}"] = info
        mem_planned = [p for m, p in P.items() if m.startswith("train_memory")]
        time_planned = [p for m, p in P.items() if m.startswith("train_step_time")]

        def memory() -> list[ResultRow]:
            with na_backends_seen() as seen:
                per_chunk = compute.measure_train_memory_cuda(preset, B, device=device, autocast_dtype=amp)
            dev = device_with_backends(base, seen)
            info["na2d_memory"] = list(seen)
            rows: list[ResultRow] = []
            ok = {c: m for c, m in per_chunk.items() if isinstance(m, prof.CudaMemory)}
            info["memory_bytes"] = {c: (m if isinstance(m, str) else
                                        {"max_allocated": m.max_allocated, "max_reserved": m.max_reserved,
                                         "nvml_peak": m.nvml.peak_bytes, "nvml_status": m.nvml.status})
                                    for c, m in per_chunk.items()}  # fmt: skip
            for c, m in per_chunk.items():
                p = P[f"train_memory_chunk_{c}"]
                rows.append(ctx.row(p, prof.mib(m.max_allocated), device=dev) if c in ok
                            else ctx.row(p, None, method="none", status=OOM, device=dev))  # fmt: skip
            if len(ok) < len(per_chunk):  # the run's peak is unknown if a chunk did not fit
                rows += [ctx.row(P[m], None, method="none", status=OOM, device=dev)
                         for m in ("train_memory", "train_memory_reserved", "train_memory_nvml")]  # fmt: skip
                return rows
            rows.append(ctx.row(P["train_memory"], prof.mib(max(m.max_allocated for m in ok.values())), device=dev))
            rows.append(ctx.row(P["train_memory_reserved"], prof.mib(max(m.max_reserved for m in ok.values())),
                                device=dev))  # fmt: skip
            nv = [m.nvml for m in ok.values()]
            if all(r.ok and r.peak_bytes is not None for r in nv):
                rows.append(ctx.row(P["train_memory_nvml"], prof.mib(max(r.peak_bytes for r in nv)), device=dev))
            else:
                why = next(r.status for r in nv if not r.ok or r.peak_bytes is None)
                rows.append(ctx.row(P["train_memory_nvml"], None, method="none", status=why, device=dev))
            return rows

        def timing() -> list[ResultRow]:
            with na_backends_seen() as seen:
                t = compute.time_train_step(preset, B, device=device, repeats=opts.repeats, autocast_dtype=amp)
            dev = device_with_backends(base, seen)
            info["na2d_time"] = list(seen)
            info["time_s"] = {c: list(tm.times_s) for c, tm in t.chunks.items()}
            rows = [ctx.row(P["train_step_time"], t.mean_s, device=dev)]
            rows += [ctx.row(P[f"train_step_time_chunk_{c}"], tm.median_s, device=dev)
                     for c, tm in t.chunks.items()]  # fmt: skip
            return rows

        _sub_step(ctx, emit, mem_planned, est * 0.4, f"{model} training memory", memory)
        free_cuda_memory()
        _sub_step(ctx, emit, time_planned, est * 0.6, f"{model} training time", timing)

    return Check(f"table2_train_{_dt_tag(dtype_label)}_{model}",
                 f"{model} training step ({schedule.describe()}), batch {B}, {dtype_label}",
                 tuple(P.values()), est, run)  # fmt: skip


def _dt_tag(dtype_label: str) -> str:
    return "fp16" if AUTOCASTS[dtype_label] is torch.float16 else "fp32"


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

FP32, FP16 = "float32", "float32+autocast(float16)"


def build_plan(opts: PlanOptions = PlanOptions()) -> list[Check]:
    """Every check, in the order of value per second (module docstring)."""
    def sample(depth: int, dt: str) -> list[Check]:
        return [sample_check(m, p, dt, opts) for m, p in table2_models(depth)]

    def train(depth: int, dt: str) -> list[Check]:
        return [train_check(m, p, dt, opts) for m, p in table2_models(depth)]

    plan: list[Check] = [kernel_tests_check(opts.kernel_test_files)]
    plan += [parity_check(p, opts) for p in opts.tiny_presets]
    plan += sample(16, FP32)
    plan += [bench_check(64, n, opts) for n in (16, 13)]
    plan += sample(16, FP16)
    plan += train(16, FP32) + train(16, FP16)
    plan += sample(20, FP32) + sample(24, FP32) + sample(20, FP16) + sample(24, FP16)
    plan += [bench_check(2, n, opts) for n in (16, 13)]
    plan += train(20, FP32) + train(20, FP16) + train(24, FP16) + train(24, FP32)
    return plan
