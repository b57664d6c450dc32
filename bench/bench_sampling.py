"""End-to-end sampling, split into token generation and VQ-VAE decode, per model, batch,
precision and neighbourhood-attention backend (issue 13).

    pytest bench/bench_sampling.py --benchmark-json reports/bench/sampling.json
    python -m bench.to_csv reports/bench/sampling.json reports/bench/sampling.csv

(``nox -s bench`` runs both.) Random weights (timing and memory do not depend on them); every
row's ``extra_info`` holds its parameters. Three workloads (``phase``):

* ``tokens``: ``model.sample(..., decode=False)`` with the model's official sampling settings
  (``mvar.config.sampling_for``): VAR-d16, MVAR-d16 and the tiny presets, B in {1, 4},
  ``dtype`` fp32 and bf16, MVAR once per neighbourhood-attention backend (``backend``; VAR rows
  say ``none``). ``na_calls`` records the backend that actually served the na2d calls.
* ``decode``: ``decode_fhat`` (``VQVAE.fhat_to_img``, rescaled to [0, 1]) of a random f̂ of the
  right shape, per VQ-VAE preset (``model`` = ``vae-paper``, shared by VAR-d16 and MVAR-d16;
  ``vae-tiny`` for the tiny presets; ``used_by`` names them), B in {1, 4}, fp32 and bf16, in
  the default memory layout (``layout=contiguous``, bitwise the official decoder) and with
  the VQ-VAE in ``torch.channels_last`` (the convolutions follow the weights'
  layout; not bitwise: the row records ``max_abs_diff_vs_contiguous`` of the images in [0, 1]; ``ratio_vs_contiguous`` its speed).
* ``decode`` with ``impl=out_of_place``: the decoder as it was before issue 13 (every op out of
  place), fp32, default layout, next to the ``impl=in_place`` rows: ``ratio_vs_out_of_place``
  is the speed-up, ``bitwise_equal_to_in_place`` that the output did not change.
* ``decode_kv``: VAR-d16 at B = 4, fp32: the decode right after a ``sample(decode=False)``
  call, with the KV cache freed (``kv_cache=freed``, what ``sample(decode=True)`` does now) or
  still alive (``kv_cache=alive``, where the decode ran before issue 13; the cache is kept by
  holding on to the sampling step). The sampling before each round is not timed.

Precision: ``sample(dtype=...)`` and, for the standalone decode, ``mvar.precision.autocast`` (the
same autocast ``sample`` decodes under); fp16 cells on a CPU are recorded as skipped with the
reason (GPU only). ``bench.to_csv`` adds ``ratio_vs_fp32`` (fp32 median / this row's median, > 1: faster
than fp32), ``ratio_vs_dense`` between backends, ``ratio_vs_contiguous`` between layouts and
``ratio_vs_kv_alive`` between the two ``decode_kv`` rows, all from the same run.

Memory (``peak_mib``, next to the time): on a GPU ``torch.cuda.max_memory_allocated`` over one
untimed call; on the CPU the peak of live tensor bytes over one untimed call
(``mvar.profiling.memory.LiveBytesTracker``, exact bytes: weights of the modules involved
(transformer and VQ-VAE for ``tokens`` and ``decode_kv``, the VQ-VAE for ``decode``), KV
cache, activations; not the allocator's own overhead). That untimed call is also the warm-up (numba compilation, first
touch of memory). Then ``ROUNDS`` timed rounds (median reported); ``SAMPLING_BENCH_ROUNDS=1``
overrides them for a quick check of the suite (``--benchmark-min-rounds`` does not apply to
these fixed-round cells), e.g. ``SAMPLING_BENCH_ROUNDS=1 pytest bench/bench_sampling.py -k tiny``.

Budget: sized for about 10 minutes on a quiet 2-core CPU (an estimate from single-call times;
on a loaded machine it takes several times longer). So on the CPU the d16 cells of the naive
``reference`` backend (a gather of every window, the tests' oracle) are skipped, ``flex``
(eager on the CPU, no fused kernel) and ``dense`` run at B = 1 only (MVAR-d16 at B = 4 runs
``numba``, the CPU default), and ``decode_kv`` has 3 rounds; each skipped cell is recorded
with the reason. ``bench_na2d.py`` compares every backend at the kernel level.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mvar import precision
from mvar.attention import BACKENDS, backend_unavailable_reason, backends_used, reset_backends_used
from mvar.build import build_model, build_vqvae
from mvar.config import get_preset, get_vae_preset, sampling_for
from mvar.profiling.memory import LiveBytesTracker, mib, module_tensors
from mvar.sampling import decode_fhat

DEVICE = torch.device(
    os.environ.get("MVAR_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
# var-d16 last: test_decode_kv (last in the file) reuses it without a rebuild.
PRESETS = ("var-tiny", "mvar-tiny", "mvar-d16", "var-d16")
BATCHES = (1, 4)
DTYPES = precision.PRECISIONS  # fp16 cells: GPU only (recorded as skipped on a CPU)
# Timed rounds per cell; SAMPLING_BENCH_ROUNDS=<n> sets every cell's (a quick check of the suite).
_ROUNDS_ENV = os.environ.get("SAMPLING_BENCH_ROUNDS")
ROUNDS = (
    {"tiny": 5, "d16": 3} if not _ROUNDS_ENV else dict.fromkeys(("tiny", "d16"), int(_ROUNDS_ENV))
)
# decode_kv samples VAR-d16 at B = 4 (~16 s on the quiet 2-core CPU) before every round: 3 rounds.
KV_ROUNDS = 3 if not _ROUNDS_ENV else int(_ROUNDS_ENV)
NO_NA = "none"  # the backend column of VAR rows: no neighbourhood attention
KV_BATCH = 4
LAYOUTS = ("contiguous", "channels_last")  # the decoder's memory format (decode cells)

# ---------------------------------------------------------------------------------------------
# Precision: ``mvar.precision`` (the sampler's own option; fp16 is GPU-only).


def _dtype_unavailable(dtype: str) -> str | None:
    try:
        precision.check_precision(dtype, DEVICE)
    except ValueError as e:
        return str(e)
    return None


def _decode_context(dtype: str) -> contextlib.AbstractContextManager:
    # the standalone decode runs under the same autocast as the decode inside sample()
    return precision.autocast(dtype, DEVICE)


# ---------------------------------------------------------------------------------------------
# Models: one transformer alive at a time (the d16 ones hold 1.2 GB each), the VQ-VAEs cached.

_models: dict[str, nn.Module] = {}
_vaes: dict[str, nn.Module] = {}


def _vae_name(preset: str) -> str:
    return "vae-tiny" if preset.endswith("-tiny") else "vae-paper"


def _vae(name: str) -> nn.Module:
    if name not in _vaes:
        torch.manual_seed(0)
        _vaes[name] = build_vqvae(get_vae_preset(name), device=DEVICE).eval()
    return _vaes[name]


def _model(preset: str) -> nn.Module:
    if preset not in _models:
        _models.clear()
        torch.manual_seed(0)
        _models[preset] = build_model(preset, device=DEVICE).eval()
    return _models[preset]


def _labels(preset: str, B: int) -> Tensor:
    return torch.arange(B, device=DEVICE) % get_preset(preset).num_classes


def _sample_kw(preset: str) -> dict[str, Any]:
    s = sampling_for(preset, None, None, None)
    return {"guidance": s.guidance, "top_k": s.top_k, "top_p": s.top_p, "g_seed": 0}


# ---------------------------------------------------------------------------------------------
# Measurement


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _record_peak(
    benchmark: Any, fn: Callable[[], Any], *modules: nn.Module, keep: list[Tensor] | None = None
) -> None:
    """One untimed call of ``fn`` (it is the warm-up too); its peak memory goes into
    ``peak_mib`` (module docstring), or ``peak_note`` says why it was not measured."""
    if DEVICE.type == "cuda":
        _sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        fn()
        _sync()
        benchmark.extra_info["peak_mib"] = round(mib(torch.cuda.max_memory_allocated(DEVICE)), 1)
        return
    tracker = LiveBytesTracker(round_to=1)
    tracker.track(module_tensors(*modules), "weights")
    tracker.track(keep or [], "inputs")
    try:
        with tracker, torch.no_grad():
            fn()
    except NotImplementedError as exc:  # a higher-order op (FlexAttention) the mode cannot see
        reset_backends_used()  # count the na2d calls of the complete run only
        fn()
        benchmark.extra_info["peak_mib"] = ""
        benchmark.extra_info["peak_note"] = f"not measured: {str(exc).splitlines()[0][:120]}"
        return
    benchmark.extra_info["peak_mib"] = round(mib(tracker.peak), 1)


def _info(benchmark: Any, **params: Any) -> dict[str, Any]:
    info = {
        **params,
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    benchmark.group = f"{params['phase']} {params['model']} B={params['B']}"
    benchmark.extra_info.update(info)
    return info


def _rounds(model: str) -> int:
    return ROUNDS["tiny"] if "tiny" in model else ROUNDS["d16"]


def _budget_skip(preset: str, backend: str, B: int) -> str | None:
    if DEVICE.type != "cpu" or preset.endswith("-tiny"):
        return None
    if backend == "reference":
        return ("the naive reference (gathers every window) at d16 does not fit the suite's "
                "10-minute CPU budget; bench_na2d.py times it per kernel")  # fmt: skip
    if backend in ("flex", "dense") and B > 1:
        return (f"{backend} at d16 on the CPU runs at B = 1 only (the suite's time budget; "
                "B = 1 compares it with numba)")  # fmt: skip
    return None


# Decorator order: pytest varies the top parametrize fastest, so the fp32 and bf16 cells (and
# the backends) of one model and batch are timed back to back.
_TOKEN_CELLS = [
    (preset, backend)
    for preset in PRESETS
    for backend in (BACKENDS if get_preset(preset).arch == "mvar" else (NO_NA,))
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize(
    ("preset", "backend"), _TOKEN_CELLS, ids=[f"{p}-{b}" for p, b in _TOKEN_CELLS]
)
def test_tokens(benchmark, record_skip, preset: str, backend: str, B: int, dtype: str) -> None:
    kw = _sample_kw(preset)
    info = _info(benchmark, model=preset, phase="tokens", B=B, dtype=dtype, backend=backend,
                 guidance=kw["guidance"], top_k=kw["top_k"], top_p=kw["top_p"])  # fmt: skip
    if backend != NO_NA and (why := backend_unavailable_reason(backend, DEVICE)) is not None:
        record_skip(info, why)
    if (why := _budget_skip(preset, backend, B) or _dtype_unavailable(dtype)) is not None:
        record_skip(info, why)
    model, vae = _model(preset), _vae(_vae_name(preset))
    if backend != NO_NA:
        model.neighbourhood_attention.backend = backend
    labels = _labels(preset, B)
    kw["dtype"] = dtype

    def run() -> None:
        model.sample(vae, labels, decode=False, **kw)
        _sync()

    reset_backends_used()
    _record_peak(benchmark, run, model, vae)
    benchmark.extra_info["na_calls"] = " ".join(
        f"{k}:{v}" for k, v in sorted(backends_used().items())
    )
    benchmark.pedantic(run, rounds=_rounds(preset), warmup_rounds=0)


_DECODE_CELLS = [("vae-tiny", "var-tiny mvar-tiny"), ("vae-paper", "var-d16 mvar-d16")]


_contiguous_images: dict[tuple, Tensor] = {}  # the default layout's output, per decode cell


def _channels_last_vae(name: str) -> nn.Module:
    key = f"{name}:channels_last"
    if key not in _vaes:
        _vaes[key] = copy.deepcopy(_vae(name)).to(memory_format=torch.channels_last)
    return _vaes[key]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize(("vae_name", "used_by"), _DECODE_CELLS, ids=[c[0] for c in _DECODE_CELLS])
def test_decode(
    benchmark, record_skip, vae_name: str, used_by: str, B: int, dtype: str, layout: str
) -> None:
    info = _info(benchmark, model=vae_name, used_by=used_by, phase="decode", B=B, dtype=dtype,
                 layout=layout, impl="in_place")  # fmt: skip
    if (why := _dtype_unavailable(dtype)) is not None:
        record_skip(info, why)
    vae = _vae(vae_name) if layout == "contiguous" else _channels_last_vae(vae_name)
    N = vae.cfg.patch_nums[-1]
    torch.manual_seed(0)
    fhat = torch.randn(B, vae.cfg.Cvae, N, N, device=DEVICE)
    images: list[Tensor] = []

    def run() -> None:
        with _decode_context(dtype):
            img = decode_fhat(vae, fhat)
        _sync()
        images[:] = [img]

    _record_peak(benchmark, run, vae, keep=[fhat])
    key = (vae_name, B, dtype)
    if layout == "contiguous":
        _contiguous_images[key] = images[0]
    elif key in _contiguous_images:  # what the layout costs in accuracy (fp32 parity: 1e-3)
        err = (images[0].float() - _contiguous_images[key].float()).abs().max().item()
        benchmark.extra_info["max_abs_diff_vs_contiguous"] = err
    images.clear()
    benchmark.pedantic(run, rounds=_rounds(vae_name), warmup_rounds=0)


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize(("vae_name", "used_by"), _DECODE_CELLS, ids=[c[0] for c in _DECODE_CELLS])
def test_decode_before(benchmark, vae_name: str, used_by: str, B: int) -> None:
    """The decoder as it was before issue 13 (every op out of place; the formula of
    tests/test_decode.py), fp32, default layout: ``ratio_vs_out_of_place`` of the ``in_place``
    row is the speed-up, ``bitwise_equal_to_in_place`` checks the output did not change."""
    from tests.test_decode import decode_out_of_place

    _info(benchmark, model=vae_name, used_by=used_by, phase="decode", B=B, dtype="fp32",
          layout="contiguous", impl="out_of_place")  # fmt: skip
    vae = _vae(vae_name)
    N = vae.cfg.patch_nums[-1]
    torch.manual_seed(0)
    fhat = torch.randn(B, vae.cfg.Cvae, N, N, device=DEVICE)  # the same f̂ as test_decode
    images: list[Tensor] = []

    def run() -> None:
        with torch.no_grad():
            img = decode_out_of_place(vae, fhat)
        _sync()
        images[:] = [img]

    _record_peak(benchmark, run, vae, keep=[fhat])
    after = _contiguous_images.get((vae_name, B, "fp32"))
    if after is not None:
        benchmark.extra_info["bitwise_equal_to_in_place"] = bool(torch.equal(images[0], after))
    images.clear()
    benchmark.pedantic(run, rounds=_rounds(vae_name), warmup_rounds=0)


@contextlib.contextmanager
def _keeping_kv_cache(model: nn.Module, held: list) -> Iterator[None]:
    """While inside, every sampling step ``model.sample`` makes is also kept in ``held``, so its
    KV cache outlives the call (the state the decode ran in before issue 13)."""
    make_step = model.sampling_step

    def sampling_step():  # type: ignore[no-untyped-def]
        pair = make_step()
        held.append(pair)
        return pair

    model.sampling_step = sampling_step
    try:
        yield
    finally:
        del model.sampling_step


@pytest.mark.parametrize("kv_cache", ["alive", "freed"])
def test_decode_kv(benchmark, kv_cache: str) -> None:
    preset, B = "var-d16", KV_BATCH
    _info(benchmark, model=preset, phase="decode_kv", B=B, dtype="fp32", kv_cache=kv_cache)
    model, vae = _model(preset), _vae(_vae_name(preset))
    labels, kw = _labels(preset, B), _sample_kw(preset)
    held: list = []

    def setup() -> tuple[tuple[Tensor], dict]:
        held.clear()  # the previous round's cache goes before this round samples
        with _keeping_kv_cache(model, held) if kv_cache == "alive" else contextlib.nullcontext():
            out = model.sample(vae, labels, decode=False, **kw)
        _sync()
        benchmark.extra_info["kv_cache_bytes"] = out.kv_cache_bytes
        return (out.fhat,), {}

    def run(fhat: Tensor) -> None:
        decode_fhat(vae, fhat)
        _sync()

    (fhat,), _ = setup()
    live = [t for pair in held for t in _cache_tensors(pair)]
    _record_peak(benchmark, lambda: run(fhat), model, vae, keep=[fhat, *live])
    del live  # the round's own setup decides what stays alive
    benchmark.pedantic(run, setup=setup, rounds=KV_ROUNDS, warmup_rounds=0)
    held.clear()


def _cache_tensors(pair: tuple) -> list[Tensor]:
    """The tensors of the KV cache behind a ``sampling_step()`` pair (its ``nbytes`` is bound
    to the cache object)."""
    cache = getattr(pair[1], "__self__", None)
    if cache is None:
        return []
    return [t for t in (*cache.k, *cache.v) if t is not None]
