"""Efficiency profiling (the instruments of ``mvar.profiling``, the measurements of
``repro.compute``): attention-FLOP counting against hand counts and the
closed form, the paper's GFLOPs and KV-cache cells, the live-bytes tracker, the NVML poller
without a driver, and honest timing."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mvar import profiling as prof
from mvar.blocks import DenseAttention, NeighbourhoodAttention
from mvar.build import build_model
from mvar.config import get_preset
from mvar.schedule import TrainSchedule
from repro import compute

# docs/paper_numbers.md §3-4 (Table 2 / ablation): attention GFLOPs per image (conditional branch).
PAPER_GFLOPS = {
    "var-d16": 43.61,
    "var-d20": 81.52,
    "var-d24": 136.63,
    "mvar-d16": 35.44,
    "mvar-d20": 68.75,
    "mvar-d24": 118.25,
    "mvar-d16-scale-markov": 37.84,
}
# docs/counting.md §5 (Table 2): KV cache at batch 32 with CFG, fp32, MiB.
PAPER_KV_MIB = {"var-d16": 5440, "var-d20": 8500, "var-d24": 12240}


# --- closed form -----------------------------------------------------------------------------


def test_pair_counts_match_the_papers_worked_numbers() -> None:
    # docs/counting.md §2: VAR 286,434 pairs per layer; scale-Markov 110,468; MVAR 16,371 + 425*49.
    assert sum(prof.attention_pairs_per_scale("var-d16")) == 286_434
    assert sum(prof.attention_pairs_per_scale("mvar-d16-scale-markov")) == 110_468
    mvar = prof.attention_pairs_per_scale("mvar-d16")
    assert sum(mvar[:8]) == 16_371 and mvar[8:] == [169 * 49, 256 * 49]
    assert sum(mvar) == 37_196


def test_analytic_d16_split_matches_paper_worked_example() -> None:
    # docs/counting.md §3: d16 qkv = 3*1024^2*680*16 = 34.23 G; VAR pairs part 286,434*2*1024*16 = 9.39 G.
    a = prof.analytic_attention_macs("var-d16")
    assert a.qkv == 3 * 1024**2 * 680 * 16
    assert a.qk == a.av == 286_434 * 1024 * 16
    assert round(a.qkv / 1e9, 2) == 34.23 and round((a.qk + a.av) / 1e9, 2) == 9.39


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_analytic_gflops_equal_paper(name: str) -> None:
    got = prof.analytic_attention_macs(name).gflops
    assert compute.gflops_close(got, PAPER_GFLOPS[name]), f"{name}: {got:.4f} vs {PAPER_GFLOPS[name]}"


@pytest.mark.parametrize("name", sorted(PAPER_KV_MIB))
def test_analytic_kv_cache_equals_paper(name: str) -> None:
    assert prof.analytic_kv_cache_bytes(name, 32) == PAPER_KV_MIB[name] * 2**20
    assert prof.analytic_kv_cache_bytes(name.replace("var", "mvar"), 32) == 0


def test_gflops_tolerance_rejects_a_real_difference() -> None:
    assert compute.gflops_close(81.5121408, 81.52)
    assert not compute.gflops_close(43.61 + 0.02, 43.61)


# --- the counter on hand-built calls (exact, hand-computed) ----------------------------------


class _TwoCores(nn.Module):
    """Calls a DenseAttention (with and without a mask) and a NeighbourhoodAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = DenseAttention(1.0)
        self.na = NeighbourhoodAttention(3, 1.0, backend="reference")

    def forward(self, bias: torch.Tensor | None) -> None:
        B, H, c = 2, 2, 4  # C = 8
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, 3, c, generator=g)
        kv = torch.randn(B, H, 5, c, generator=g)
        self.dense(q, kv, kv, bias)
        q2 = torch.randn(B, H, 16, c, generator=g)  # a 4x4 grid
        self.na(q2, q2, q2, (4, 4))


def test_counter_exact_counts_by_hand() -> None:
    bias = torch.full((1, 1, 3, 5), -math.inf)
    bias[..., 0, :1] = 0  # query 0 sees 1 key
    bias[..., 1, :3] = 0  # query 1 sees 3 keys
    bias[..., 2, :] = 0  # query 2 sees 5 keys  -> 9 pairs
    m = _TwoCores()
    with prof.AttentionCounter(m) as counter:
        m(bias)
    r = counter.result()
    # C = 8. Dense: qkv 3 queries * 3*64 = 576; pairs 9. NA 4x4, k=3: 16 queries * 9 keys =
    # 144 pairs, qkv 16 * 192 = 3072. Per row (image); the B=2 rows are divided out.
    assert counter.calls == 2
    assert r.qkv == 576 + 3072
    assert r.pairs == 9 + 144
    assert r.qk == r.av == 8 * (9 + 144)
    assert r.total == 3648 + 2 * 8 * 153

    m2 = _TwoCores()
    with prof.AttentionCounter(m2) as c2:
        m2(None)  # unmasked: 3 * 5 = 15 pairs
    assert c2.result().pairs == 15 + 144


def test_counter_refuses_to_guess_a_fake_mask() -> None:
    m = _TwoCores()
    with FakeTensorMode():
        bias = torch.zeros(1, 1, 3, 5)
        q = torch.randn(2, 2, 3, 4)
        kv = torch.randn(2, 2, 5, 4)
        with prof.AttentionCounter(m), pytest.raises(RuntimeError, match="fake/meta"):
            m.dense(q, kv, kv, bias)


def test_counter_needs_attention_modules() -> None:
    with pytest.raises(ValueError, match="DenseAttention"):
        prof.AttentionCounter(nn.Linear(2, 2)).__enter__()


# --- the counter on real tiny models: hand count == closed form == counted --------------------

# var-tiny: depth 2, C = 128, 680 tokens. qkv = 3*128^2*680*2 = 66,846,720; pairs 286,434*2 =
# 572,868; qk = av = 128*572,868 = 73,327,104; total 213,500,928.
VAR_TINY_TOTAL = 66_846_720 + 2 * 73_327_104


def test_var_tiny_counts_by_hand_teacher_forcing_and_sampling(tiny_vae: nn.Module) -> None:
    model = build_model("var-tiny").eval()
    assert prof.analytic_attention_macs("var-tiny").total == VAR_TINY_TOTAL
    B = 2
    x = torch.randn(B, 679, 16)  # tiny Cvae = 16
    with torch.no_grad(), prof.AttentionCounter(model) as tf:  # the real block-causal mask
        model(torch.tensor([1, 2]), x)
    assert tf.result().total == VAR_TINY_TOTAL
    with prof.AttentionCounter(model) as smp:  # KV cache, no mask, 2B CFG rows
        out = model.sample(tiny_vae, torch.tensor([1, 2]), guidance=1.5, top_k=10, g_seed=0,
                           decode=False)  # fmt: skip
    assert smp.result().total == VAR_TINY_TOTAL
    # Real cache tensors: 2 (K,V) * 2 layers * 2B rows * 680 * 128 * 4 bytes.
    assert out.kv_cache_bytes == 2 * 2 * 4 * 680 * 128 * 4
    assert out.kv_cache_bytes == prof.analytic_kv_cache_bytes("var-tiny", B)


@pytest.mark.parametrize("name", ["mvar-tiny", "mvar-tiny-scale-markov"])
def test_mvar_tiny_counted_equals_closed_form(tiny_vae: nn.Module, name: str) -> None:
    model = build_model(name, na_backend="reference").eval()
    want = prof.analytic_attention_macs(name)
    x = torch.randn(2, 679, 16)
    with torch.no_grad(), prof.AttentionCounter(model) as tf:  # chunks: 0-7 masked, 8, 9 NA
        model(torch.tensor([1, 2]), x)
    assert tf.result() == want
    with prof.AttentionCounter(model) as smp:
        out = model.sample(tiny_vae, torch.tensor([1, 2]), guidance=1.5, top_k=10, g_seed=0,
                           decode=False)  # fmt: skip
    assert smp.result() == want
    assert out.kv_cache_bytes == 0


def test_counting_distinguishes_the_patterns() -> None:
    # The closed-form counts of the three patterns are distinct (the hook counts are checked
    # against the closed form in the tests above).
    g = {n: prof.analytic_attention_macs(n).pairs for n in ("var-tiny", "mvar-tiny",
                                                             "mvar-tiny-scale-markov")}  # fmt: skip
    assert g["var-tiny"] > g["mvar-tiny-scale-markov"] > g["mvar-tiny"]


# --- paper-size counts on fake tensors ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_paper_size_counted_gflops_and_kv_cache(name: str) -> None:
    batch = 32 if name in PAPER_KV_MIB else 1
    c = compute.count_sampling(name, batch=batch, guidance=1.5)
    assert c.macs == prof.analytic_attention_macs(name)
    assert compute.gflops_close(c.macs.gflops, PAPER_GFLOPS[name]), (name, c.macs.gflops)
    if name in PAPER_KV_MIB:
        assert c.kv_cache_bytes == PAPER_KV_MIB[name] * 2**20
    else:
        assert c.kv_cache_bytes == 0


# --- full-model MACs (docs/counting.md §4) ---------------------------------------------------


class _Layers(nn.Module):
    """A linear layer, a convolution, a transposed convolution and an attention core."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.up = nn.ConvTranspose2d(3, 2, kernel_size=2, stride=2)
        self.core = DenseAttention(1.0)

    def forward(self, x: torch.Tensor, img: torch.Tensor, q: torch.Tensor) -> None:
        self.lin(x)
        self.up(self.conv(img))
        self.core(q, q, q)


def test_model_flop_counter_exact_counts_by_hand() -> None:
    m, vae = _Layers(), nn.Linear(5, 7, bias=False)
    x, img = torch.randn(3, 5, 4), torch.randn(1, 2, 4, 4)
    q = torch.randn(2, 2, 6, 4)  # B=2 rows, H=2, 6 tokens, c=4 -> C=8
    with prof.ModelFlopCounter(m, vae, images=1) as c:
        m(x, img, q)
        vae(torch.randn(2, 5))
        torch.randn(3, 4) @ torch.randn(4, 2)  # outside every module
    r = c.result()
    lin = 3 * 5 * 4 * 6  # tokens · in · out
    conv = (4 * 4) * 3 * (2 * 3 * 3)  # output positions · Cout · Cin·k²
    up = (4 * 4) * 3 * (2 * 2 * 2)  # transposed: input positions · Cin · Cout·k²
    core = 2 * 8 * (6 * 6) * 2  # (q·kᵀ + a·v) · C · pairs per row · rows
    assert r.attention_core == core
    assert r.attention_core_dispatched == core  # unmasked SDPA computes exactly these pairs
    assert r.transformer == lin + conv + up + core
    assert r.vae == 2 * 5 * 7
    assert r.other == 3 * 4 * 2
    with pytest.raises(ValueError, match="images"):
        prof.ModelFlopCounter(m, images=0)


def _linear_macs_by_hand(model: nn.Module, rows: int, images: int) -> int:
    """Every nn.Linear of the transformer times the tokens it sees while sampling: the block
    and head projections run on every token of every row, the AdaLN projections once per scale
    and row, ``word_embed`` on the conditional rows' L - 1 input tokens."""
    cfg = model.config
    L, S = cfg.seq_len, len(cfg.patch_nums)
    total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        mac = mod.in_features * mod.out_features
        if name.endswith("ada_lin.1"):
            total += mac * rows * S
        elif name == "word_embed":
            total += mac * images * (L - 1)
        else:  # mat_qkv, proj, fc1, fc2, head
            total += mac * rows * L
    return total


@pytest.mark.parametrize(("name", "cfg", "rows"), [("var-tiny", 1.5, 4), ("mvar-tiny", 1.5, 4),
                                                   ("mvar-tiny", 1.0, 2), ("var-tiny", 1.0, 4)])
def test_sampling_macs_counted_equal_hand_count(tiny_vae: nn.Module, name: str, cfg: float,
                                                rows: int) -> None:  # fmt: skip
    # Real tensors; MVAR's neighbourhood scales through the reference kernel (gathered
    # windows), VAR with its KV cache; guidance doubles the rows except MVAR at cfg 1.
    model = build_model(name, na_backend="reference").eval()
    B = 2
    with torch.no_grad(), prof.ModelFlopCounter(model, tiny_vae, images=B) as c:
        out = model.sample(tiny_vae, torch.tensor([1, 2]), cfg=cfg, top_k=10, g_seed=0,
                           decode=False)  # fmt: skip
    r = c.result()
    assert r.rows == rows and out.guided == (rows == 2 * B)
    C = model.config.embed_dim
    pairs = prof.analytic_attention_macs(name).pairs  # per image, all layers (hand-checked above)
    assert r.attention_core == 2 * C * pairs * rows
    assert r.transformer == _linear_macs_by_hand(model, rows, B) + r.attention_core
    assert r.transformer == prof.analytic_sampling_macs(name, guided=rows == 2 * B) * B
    assert r.other == 0
    assert r.vae > 0  # the quantizer's φ convolutions
    assert r.full_gflops_per_image == r.transformer / B / 1e9


def test_model_flop_counter_agrees_with_torch_flop_counter(tiny_vae: nn.Module) -> None:
    # torch's own FlopCounterMode counts 2 FLOPs per MAC; with SDPA forced to its math kernel
    # every op is a matmul it knows, so the totals must agree (decode included).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("var-tiny").eval()
    labels = torch.tensor([1, 2])
    kw = {"cfg": 1.5, "top_k": 10, "g_seed": 0, "decode": True}
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        with prof.ModelFlopCounter(model, tiny_vae, images=2) as c:
            model.sample(tiny_vae, labels, **kw)
        with FlopCounterMode(display=False) as ref:
            model.sample(tiny_vae, labels, **kw)
    r = c.result()
    dispatched = r.transformer - r.attention_core + r.attention_core_dispatched + r.vae + r.other
    assert 2 * dispatched == ref.get_total_flops()
    assert r.attention_core_dispatched == r.attention_core  # VAR: no masked pair computed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["var-d16", "mvar-d16", "mvar-d20"])
def test_paper_size_full_macs_on_fake_tensors(name: str) -> None:
    # Paper size, nothing allocated: the counted run equals the closed form; MVAR's
    # neighbourhood scales run masked dense attention under fake tensors (more dispatched MACs
    # than the 49 allowed pairs), which the full-model metric does not count.
    r = compute.count_model_macs(name, batch=1, guidance=1.5, decode=True)
    assert r.transformer == prof.analytic_sampling_macs(name)
    assert r.vae > 0
    if name.startswith("mvar"):
        assert r.attention_core_dispatched > r.attention_core


# --- live-bytes tracker -------------------------------------------------------------------------


def test_tracker_exact_bytes_by_hand() -> None:
    tr = prof.LiveBytesTracker(round_to=1)
    with tr:
        a = torch.zeros(1000)  # 4000 B
        assert tr.current == 4000
        b = a * 2  # +4000
        assert tr.current == 8000
        v = a.view(10, 100)  # a view: no new storage
        a.add_(1)  # in place: no new storage
        assert tr.current == 8000
        del b
        gc.collect()
        assert tr.current == 4000
        c = torch.empty(10, dtype=torch.float64)  # 80 B
    assert tr.peak == 8000
    assert tr.current == 4080
    del a, v, c
    gc.collect()
    assert tr.current == 0


def test_tracker_rounds_to_cuda_blocks_and_tracks_weights() -> None:
    lin = nn.Linear(8, 16)  # weight 512 B, bias 64 B
    x = torch.randn(4, 8)  # 128 B
    tr = prof.LiveBytesTracker(round_to=1)
    assert tr.track(prof.module_tensors(lin), "weights") == 576
    tr.track([x], "inputs")
    with tr, torch.no_grad():
        y = lin(x)  # one addmm output (4, 16) = 256 B
    assert tr.peak == 576 + 128 + 256
    assert tr.peak_by_category == {"weights": 576, "inputs": 128, "activations": 256}
    tr512 = prof.LiveBytesTracker()  # 512-byte blocks
    tr512.track(prof.module_tensors(lin))
    with tr512:
        z = torch.zeros(3)  # 12 B -> one 512 B block
    assert tr512.current == 512 + 512 + 512
    del y, z


def test_tracker_phases_and_fake_equals_real() -> None:
    def run() -> tuple[int, dict[str, int]]:
        tr = prof.LiveBytesTracker(round_to=1)
        with tr:
            x = torch.ones(256, 256)  # 262,144 B
            with tr.phase("big"):
                y = x @ x  # + 262,144
                z = y.relu()  # + 262,144 -> phase peak 786,432
                del y, z
            with tr.phase("small"):
                w = x.sum()  # + 4
            del w
        return tr.peak, dict(tr.phase_peaks)

    real = run()
    with FakeTensorMode():
        fake = run()
    assert real == fake == (786_432, {"big": 786_432, "small": 262_148})


def test_tracker_follows_backward_and_optimizer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)  # 16,384 B
    opt = torch.optim.AdamW(lin.parameters(), foreach=False)
    tr = prof.LiveBytesTracker(round_to=1)
    tr.track(prof.module_tensors(lin))
    with tr, tr.phase("step"):
        lin(torch.randn(32, 64)).square().sum().backward()
        assert lin.weight.grad is not None
        opt.step()
    # After the step: weight + grad + exp_avg + exp_avg_sq (+ a 4 B step counter) are live.
    assert tr.current >= 4 * 16_384
    assert tr.phase_peaks["step"] >= tr.current


# --- paper-size memory estimates (fake tensors) -----------------------------------------------


@pytest.mark.slow
def test_paper_size_inference_estimate_is_consistent() -> None:
    var = compute.estimate_inference_memory("var-d16", 32, decode=False)
    sm = compute.estimate_inference_memory("mvar-d16-scale-markov", 32, decode=False)
    weights = 310_283_520 * 4 + 108_948_355 * 4
    # Resident: transformer + VQ-VAE parameters, plus buffers (the 680x680 fp32 mask is 1.85 MB)
    # and the rounding of each tensor to 512 B blocks.
    assert weights + 680 * 680 * 4 <= var.weights < weights + 4 * 2**20
    assert var.kv_cache == 5440 * 2**20 and sm.kv_cache == 0
    # VAR's last scale does what the scale-Markov model's does, with the whole cache on top.
    assert sm.weights < sm.tokens
    assert var.tokens >= sm.tokens + var.kv_cache
    assert var.method == sm.method == "estimated"


@pytest.mark.slow
def test_paper_size_train_estimate_chunks() -> None:
    t = compute.estimate_train_memory("mvar-d16-scale-markov", 4)
    assert list(t.chunks) == ["0-7", "8", "9"]
    assert t.peak == max(t.chunks.values())
    # weights + grads + AdamW (exp_avg, exp_avg_sq) at least
    assert t.peak > t.weights + t.grads + t.optimizer_state - 512 * 1000
    assert t.optimizer_state >= 2 * 310_283_520 * 4


def test_profiler_uses_the_trainers_schedule() -> None:
    for name in ("var-d16", "mvar-d16", "mvar-d16-scale-markov"):
        assert compute.train_schedule(name) == TrainSchedule.for_config(get_preset(name))
    assert compute.train_schedule("var-d16").chunks == (tuple(range(10)),)
    assert compute.train_schedule("mvar-d16-scale-markov").chunks == (tuple(range(8)), (8,), (9,))
    assert compute.train_schedule("mvar-d16").describe() == "0-7×8 8×1 9×1"


def test_train_timing_is_weighted_by_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake per-chunk medians 1 s (0-7), 3 s (8), 5 s (9): an iteration costs (8+3+5)/10 s.
    medians = iter([1.0, 3.0, 5.0])

    def fake_time_call(fn: object, **kw: object) -> prof.Timing:
        m = next(medians)
        return prof.Timing(m, m, m, 1, 0, "cpu")

    monkeypatch.setattr(compute, "time_call", fake_time_call)
    t = compute.time_train_step("mvar-tiny", 1)
    assert list(t.chunks) == ["0-7", "8", "9"]
    assert t.mean_s == pytest.approx(1.6) and t.schedule == "0-7×8 8×1 9×1"


# --- NVML without a driver --------------------------------------------------------------------


def test_nvml_degrades_cleanly_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    with prof.NvmlPeakPoller() as p:
        pass
    r = p.reading
    assert not r.ok and r.peak_bytes is None
    assert r.status.startswith("not measured: NVML unavailable")


def test_nvml_on_this_machine_never_raises() -> None:
    # On a CPU-only machine this is the real "no library / no driver" path; on a GPU it polls.
    with prof.NvmlPeakPoller(interval_s=0.001) as p:
        torch.zeros(10).sum()
    r = p.reading
    if torch.cuda.is_available() and r.ok:
        assert r.peak_bytes is not None and r.peak_bytes >= (r.baseline_bytes or 0)
    else:
        assert r.status.startswith("not measured:") and "NVML" in r.status


def test_nvml_polls_a_fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    used = iter([100, 300, 200] + [150] * 10_000)

    class Info:
        def __init__(self) -> None:
            self.used = next(used)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: object())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: Info())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with prof.NvmlPeakPoller(interval_s=0.0005) as p:
        import time

        time.sleep(0.02)
    r = p.reading
    assert r.ok and r.baseline_bytes == 100 and r.peak_bytes == 300 and r.samples >= 3


# --- timing ---------------------------------------------------------------------------------------


def test_time_call_excludes_warmup_and_takes_the_median() -> None:
    import time

    calls = []
    sleeps = iter([0.05, 0.001, 0.003, 0.002])  # the first (warm-up) is slow and not timed

    def fn() -> None:
        calls.append(1)
        time.sleep(next(sleeps))

    t = prof.time_call(fn, warmup=1, repeats=3)
    assert len(calls) == 4 and t.repeats == 3 and t.warmup == 1
    assert t.max_s < 0.05
    assert t.min_s <= t.median_s <= t.max_s and len(t.times_s) == 3
    with pytest.raises(ValueError):
        prof.time_call(fn, repeats=0)


def test_fake_runs_do_not_poison_the_dense_mask_cache() -> None:
    # The dense NA backend caches its mask per grid; a real mask served to a fake run (or a
    # fake one to a real run) fails. Real -> fake count -> real must all work.
    from mvar.attention import na2d

    q = torch.randn(1, 2, 13, 13, 8)
    want = na2d(q, q, q, 7, backend="dense")
    c = compute.count_sampling("mvar-tiny", batch=1)
    assert c.macs == prof.analytic_attention_macs("mvar-tiny")
    assert torch.equal(na2d(q, q, q, 7, backend="dense"), want)
