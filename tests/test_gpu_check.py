"""``python -m repro.gpu_check`` without a GPU: the plan, the runner's time limit and outcome
rows (fake clock, fake checks), the CSV/JSON record, the watchdog, the no-GPU exit, and the
checks' own logic on the CPU (kernel-test parsing through a real pytest subprocess, GPU-vs-CPU
parity with CPU backends, the benchmark's CPU cells, the Table 2 cells over fake
measurements)."""

from __future__ import annotations

import argparse
import csv
import json
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar import profiling as prof
from repro import checkrun, gpu_check, gpu_checks
from repro.checkrun import (
    NOT_REACHED,
    OOM,
    TIME_LIMIT,
    Check,
    Context,
    Planned,
    TimeLimitReached,
    Watchdog,
    run_checks,
)
from repro.report import COLUMNS, Environment

ENV = Environment(device="cuda: Fake GPU", dtype="float32", torch=torch.__version__, git_sha="abc")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _ctx(budget: float, clock: FakeClock | None = None, **extra) -> Context:
    clock = clock or FakeClock()
    return Context(env=ENV, deadline=clock() + budget, clock=clock, extra=extra)


def _planned(name: str, n: int = 2) -> tuple[Planned, ...]:
    return tuple(Planned("t", name, f"m{i}", "s", "float32", 1) for i in range(n))


def fake_check(name: str, *, estimate: float = 10.0, takes: float = 10.0, n: int = 2,
               behaviour: str = "ok", clock: FakeClock) -> Check:  # fmt: skip
    """A check that 'sleeps' on the fake clock. behaviours: ok, fail (a wrong result), oom,
    error, partial (emits its first row, then hits the time limit via guard), unplanned,
    missing (returns without its last row), steps (guards before each row; the clock runs
    ``takes / n`` per row)."""
    planned = _planned(name, n)

    def run(ctx: Context, emit) -> None:
        if behaviour == "steps":
            for p in planned:
                ctx.guard(takes / n, f"{name} {p.metric}")
                clock.sleep(takes / n)
                emit(ctx.row(p, 1.0))
            return
        clock.sleep(takes)
        if behaviour == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if behaviour == "error":
            raise RuntimeError("boom")
        if behaviour == "partial":
            emit(ctx.row(planned[0], 1.0))
            ctx.guard(1e9, f"{name} second step")
        if behaviour == "unplanned":
            emit(ctx.row(Planned("t", name, "nope", "s", "float32", 1), 1.0))
        rows = planned[:-1] if behaviour == "missing" else planned
        for i, p in enumerate(rows):
            status = "fail: wrong by 1" if behaviour == "fail" and i == 0 else "ok"
            emit(ctx.row(p, float(i), status=status))

    return Check(name, f"fake {behaviour}", planned, estimate, run)


def _statuses(result: checkrun.RunResult) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in result.rows:
        out.setdefault(r.model, []).append(r.status)
    return out


# --- the runner ------------------------------------------------------------------------------


def test_budget_skips_what_does_not_fit_and_runs_cheaper_checks_after() -> None:
    clock = FakeClock()
    checks = [fake_check("a", estimate=30, takes=30, clock=clock),
              fake_check("b", estimate=50, takes=50, clock=clock),
              fake_check("c", estimate=40, takes=40, clock=clock),  # 20 s left: skipped
              fake_check("d", estimate=10, takes=10, clock=clock)]  # fmt: skip
    result = run_checks(checks, _ctx(100, clock))
    st_ = _statuses(result)
    assert st_["a"] == st_["b"] == st_["d"] == ["ok", "ok"]
    assert st_["c"] == [TIME_LIMIT, TIME_LIMIT]
    assert [o.outcome for o in result.outcomes] == ["ok", "ok", "skipped", "ok"]
    assert clock.t == 90 and not result.failed and not result.stopped_early


def test_guard_inside_a_check_keeps_its_rows_and_marks_the_rest() -> None:
    clock = FakeClock()
    # estimate 10 fits, but each of its 4 steps takes 10: two run, the third does not fit
    checks = [fake_check("slow", estimate=10, takes=40, n=4, behaviour="steps", clock=clock)]
    result = run_checks(checks, _ctx(25, clock))
    assert [r.status for r in result.rows] == ["ok", "ok", TIME_LIMIT, TIME_LIMIT]
    assert [r.value for r in result.rows] == [1.0, 1.0, None, None]
    assert result.outcomes[0].outcome == "time limit" and not result.failed


def test_oom_gives_oom_rows_and_the_run_goes_on() -> None:
    clock = FakeClock()
    checks = [fake_check("big", behaviour="oom", clock=clock), fake_check("next", clock=clock)]
    result = run_checks(checks, _ctx(100, clock))
    assert _statuses(result) == {"big": [OOM, OOM], "next": ["ok", "ok"]}
    assert not result.failed and result.outcomes[0].outcome == "oom"


def test_an_error_fails_the_run_after_writing_what_it_has() -> None:
    clock = FakeClock()
    seen: list[list] = []
    checks = [fake_check("first", clock=clock), fake_check("crash", behaviour="error", clock=clock),
              fake_check("later", clock=clock)]  # fmt: skip
    result = run_checks(checks, _ctx(100, clock), on_progress=lambda r, o, p: seen.append(r))
    st_ = _statuses(result)
    assert st_["first"] == ["ok", "ok"]
    assert all(s.startswith("error: RuntimeError: boom") for s in st_["crash"])
    assert st_["later"] == ["not measured: run stopped after crash raised an error"] * 2
    assert result.failed and result.stopped_early
    assert any("crash" in f for f in result.failures)
    assert [r.model for r in seen[-1]] == ["first"] * 2 + ["crash"] * 2 + ["later"] * 2
    # keep going: the later check runs, the run still fails
    clock2 = FakeClock()
    checks2 = [fake_check("crash", behaviour="error", clock=clock2), fake_check("later", clock=clock2)]
    result2 = run_checks(checks2, _ctx(100, clock2), keep_going=True)
    assert _statuses(result2)["later"] == ["ok", "ok"] and result2.failed


def test_a_wrong_result_fails_the_run_but_it_goes_on() -> None:
    clock = FakeClock()
    checks = [fake_check("wrong", behaviour="fail", clock=clock), fake_check("next", clock=clock)]
    result = run_checks(checks, _ctx(100, clock))
    assert _statuses(result) == {"wrong": ["fail: wrong by 1", "ok"], "next": ["ok", "ok"]}
    assert result.failed and not result.stopped_early
    assert result.outcomes[0].outcome == "fail"


@pytest.mark.parametrize("behaviour", ["unplanned", "missing"])
def test_a_check_that_breaks_its_plan_is_an_error(behaviour: str) -> None:
    clock = FakeClock()
    result = run_checks([fake_check("bad", behaviour=behaviour, clock=clock)], _ctx(100, clock))
    assert result.failed and result.outcomes[0].outcome == "error"
    assert len(result.rows) == 2 and any(r.status.startswith("error:") for r in result.rows)


BEHAVIOURS = ["ok", "fail", "oom", "error", "partial", "steps", "unplanned", "missing"]


@settings(max_examples=60, deadline=None)
@given(spec=st.lists(st.tuples(st.sampled_from(BEHAVIOURS), st.integers(1, 40), st.integers(1, 60),
                               st.integers(1, 4)), min_size=1, max_size=7),
       budget=st.integers(1, 150), keep_going=st.booleans())  # fmt: skip
def test_every_planned_row_gets_exactly_one_outcome(spec, budget: int, keep_going: bool) -> None:
    clock = FakeClock()
    checks = [fake_check(f"c{i}", behaviour=b, estimate=e, takes=t, n=n, clock=clock)
              for i, (b, e, t, n) in enumerate(spec)]  # fmt: skip
    snapshots: list[tuple] = []
    result = run_checks(checks, _ctx(budget, clock), keep_going=keep_going,
                        on_progress=lambda r, o, p: snapshots.append((r, p)))  # fmt: skip
    planned = [p.key for c in checks for p in c.planned]
    assert [checkrun.row_key(r) for r in result.rows] == planned  # one each, in plan order
    assert len(result.outcomes) == len(checks)
    for r in result.rows:
        assert (r.value is None) == (r.status != "ok" and not r.status.startswith("fail:"))
    # every snapshot plus its pending checks covers the whole plan
    for rows, pending in snapshots:
        keys = [checkrun.row_key(r) for r in rows] + [p.key for c in pending for p in c.planned]
        assert keys == planned
    wrong = any(b in ("fail", "error", "unplanned", "missing") for b, *_ in spec)
    if not wrong:
        assert not result.failed


def test_plans_with_repeated_names_or_rows_are_refused() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="repeat"):
        checkrun.validate_plan([fake_check("x", clock=clock), fake_check("x", clock=clock)])
    a = fake_check("x", clock=clock)
    b = Check("y", "", a.planned, 1.0, a.run)
    with pytest.raises(ValueError, match="planned by"):
        checkrun.validate_plan([a, b])
    with pytest.raises(ValueError, match="plans no rows"):
        Check("z", "", (), 1.0, a.run)


def test_watchdog_writes_then_exits_and_cancel_stops_it(tmp_path: Path) -> None:
    fired, exits = threading.Event(), []
    dog = Watchdog(0.05, fired.set, code=0, exit_fn=exits.append).start()
    assert dog.fired.wait(5) and fired.wait(5)  # on_fire runs in its own thread, after fired
    for _ in range(100):
        if exits:
            break
        time.sleep(0.01)
    assert exits == [0]
    calm = Watchdog(0.2, lambda: exits.append("fired"), exit_fn=exits.append).start()
    calm.cancel()
    time.sleep(0.3)
    assert exits == [0]
    # a writer that hangs (or raises) does not keep the process alive
    hung = Watchdog(0.01, lambda: time.sleep(60), code=0, exit_fn=exits.append, write_timeout_s=0.1)
    hung.start()
    broken = Watchdog(0.01, lambda: 1 / 0, code=0, exit_fn=exits.append, write_timeout_s=5)
    broken.start()
    for _ in range(200):
        if len(exits) == 3:
            break
        time.sleep(0.01)
    assert exits == [0, 0, 0]


# --- the record: CSV and JSON ------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_recorder_writes_a_complete_csv_after_every_check(tmp_path: Path) -> None:
    clock = FakeClock()
    ctx = _ctx(100, clock)
    checks = [fake_check("a", clock=clock), fake_check("b", n=3, clock=clock)]
    rec = gpu_check.Recorder(tmp_path, ctx, {"environment": {"gpu": "fake"}})
    copies: list[list[dict]] = []

    def progress(rows, outcomes, pending):
        rec.progress(rows, outcomes, pending)
        copies.append(_read(tmp_path / gpu_check.CSV_NAME))

    run_checks(checks, ctx, on_progress=progress)
    first, last = copies[0], copies[-1]
    assert len(first) == len(last) == 5
    assert {r["status"] for r in first} == {NOT_REACHED}  # before anything ran
    assert [r["status"] for r in last] == ["ok"] * 5
    with (tmp_path / gpu_check.CSV_NAME).open() as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    assert copies[1][2]["status"] == NOT_REACHED  # after a: b still pending
    record = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert [c["name"] for c in record["checks"]] == ["a", "b"] and record["not_run"] == []
    # the watchdog's last word: the pending checks become "time limit"
    rec.pending = [checks[1]]
    rec.rows = rec.rows[:2]
    rec.hard_stop()
    rows = _read(tmp_path / gpu_check.CSV_NAME)
    assert [r["status"] for r in rows] == ["ok", "ok", TIME_LIMIT, TIME_LIMIT, TIME_LIMIT]
    assert json.loads((tmp_path / gpu_check.JSON_NAME).read_text())["hard_stop"] is True


# --- the command line ----------------------------------------------------------------------------


def test_without_a_gpu_it_exits_3_at_once_and_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.EXIT_NO_GPU
    assert capsys.readouterr().err.startswith("gpu_check: no CUDA device (")
    assert not out.exists()
    assert gpu_check.main(["--out", str(out), "--device", "cpu"]) == gpu_check.EXIT_NO_GPU
    assert "not a CUDA device" in capsys.readouterr().err and not out.exists()


def test_list_prints_the_plan_without_a_gpu(capsys) -> None:
    assert gpu_check.main(["--list", "--only", "table2_*d16", "--skip", "*fp16*"]) == 0
    text = capsys.readouterr().out
    assert "table2_sample_fp32_var-d16" in text and "fp16" not in text.split("\n", 1)[1]
    assert "kernel_tests" not in text and "budget 432 s of a 480 s limit" in text


def test_bad_command_lines_exit_2(capsys) -> None:
    assert gpu_check.main(["--only", "no_such_check", "--list"]) == gpu_check.EXIT_USAGE
    assert "matches no check" in capsys.readouterr().err
    assert gpu_check.main(["--batch", "0", "--list"]) == gpu_check.EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--time-limit", "soon"])
    assert exc.value.code == 2


def test_parse_duration() -> None:
    assert gpu_check.parse_duration("8m") == 480 == gpu_check.parse_duration("480s")
    assert gpu_check.parse_duration("90") == 90 and gpu_check.parse_duration("1.5m") == 90
    for bad in ("0", "-1", "8h", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu_check.parse_duration(bad)


def _fake_device(monkeypatch, checks: list[Check]) -> None:
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda device: None)
    monkeypatch.setattr(gpu_check, "open_device", lambda device: (ENV, {"gpu": "fake"}))
    monkeypatch.setattr(gpu_check, "build_plan", lambda opts: checks)


def test_main_writes_csv_json_log_and_exit_status(tmp_path: Path, monkeypatch) -> None:
    def quick(name: str, behaviour: str = "ok") -> Check:
        planned = _planned(name)

        def run(ctx, emit):
            if behaviour == "error":
                raise ValueError("kaput")
            for p in planned:
                emit(ctx.row(p, 2.0, status="fail: off" if behaviour == "fail" else "ok"))

        return Check(name, behaviour, planned, 1.0, run)

    _fake_device(monkeypatch, [quick("one"), quick("two")])
    out = tmp_path / "ok"
    (out / "kernel_tests.xml").parent.mkdir(parents=True)
    (out / "kernel_tests.xml").write_text("stale")
    assert gpu_check.main(["--out", str(out)]) == 0
    rows = _read(out / "gpu_check.csv")
    assert [r["status"] for r in rows] == ["ok"] * 4 and rows[0]["device"] == ENV.device
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["exit_code"] == 0 and record["environment"] == {"gpu": "fake"}
    assert [c["outcome"] for c in record["checks"]] == ["ok", "ok"]
    assert "one: ok" in (out / "gpu_check.log").read_text()
    assert not (out / "kernel_tests.xml").exists()  # a previous run's file is not this run's

    _fake_device(monkeypatch, [quick("one", "fail"), quick("two", "error"), quick("three")])
    out = tmp_path / "bad"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.EXIT_FAILED
    rows = _read(out / "gpu_check.csv")
    assert rows[0]["status"] == "fail: off"
    assert rows[2]["status"] == "error: ValueError: kaput"
    assert rows[4]["status"].startswith("not measured: run stopped after two")
    log_text = (out / "gpu_check.log").read_text()
    assert "Traceback" in log_text and "kaput" in log_text  # the traceback is in the log file


# --- the plan --------------------------------------------------------------------------------------


def test_plan_covers_table2_bench_kernels_and_parity_in_value_order() -> None:
    plan = gpu_checks.build_plan()
    names = [c.name for c in plan]
    checkrun.validate_plan(plan)
    assert names[:3] == ["kernel_tests", "parity_var-tiny", "parity_mvar-tiny"]  # correctness first
    kinds = {k: [n for n in names if n.startswith(("table2_" + k, "na2d_" + k))]
             for k in ("sample", "train", "bench")}  # fmt: skip
    assert len(kinds["sample"]) == len(kinds["train"]) == 12 and len(kinds["bench"]) == 4
    for dt in ("fp32", "fp16"):
        for arch in ("var", "mvar-finetune"):
            order = [names.index(f"table2_sample_{dt}_{arch}-d{d}") for d in (16, 20, 24)]
            assert order == sorted(order)  # smaller (cheaper) depths first
    # the headline cells (d16 sampling, fp32) come right after correctness, before the bench
    assert names[3:5] == ["table2_sample_fp32_var-d16", "table2_sample_fp32_mvar-finetune-d16"]
    assert names.index("na2d_bench_B64_16x16") < names.index("na2d_bench_B2_16x16")
    for c in plan:
        assert 0 < c.estimate_s < 200
    total = sum(c.estimate_s for c in plan)
    assert total > gpu_check.DEFAULT_TIME_LIMIT_S  # the limit matters: its order decides what runs
    # and the first checks fit in the default budget with room for the headline cells
    budget = gpu_check.DEFAULT_TIME_LIMIT_S - gpu_check.margin_for(gpu_check.DEFAULT_TIME_LIMIT_S)
    assert sum(c.estimate_s for c in plan[:7]) < budget


def test_plan_rows_of_table2_and_the_bench() -> None:
    plan = {c.name: c for c in gpu_checks.build_plan()}
    mvar_train = {p.metric for p in plan["table2_train_fp32_mvar-finetune-d16"].planned}
    assert {"train_step_time", "train_memory", "train_memory_reserved", "train_memory_nvml",
            "train_step_time_chunk_0-7", "train_step_time_chunk_8", "train_step_time_chunk_9",
            "train_memory_chunk_0-7", "train_memory_chunk_8", "train_memory_chunk_9"} == mvar_train
    var_train = {p.metric for p in plan["table2_train_fp16_var-d24"].planned}
    assert "train_memory_chunk_0-9" in var_train
    sample = plan["table2_sample_fp16_var-d20"].planned
    assert {p.metric for p in sample} >= {"sample_time", "inference_memory",
                                          "inference_memory_reserved", "inference_memory_nvml"}
    assert {p.dtype for p in sample} == {"float32+autocast(float16)"} and {p.batch for p in sample} == {32}
    bench = plan["na2d_bench_B64_13x13"].planned
    assert {(p.model, p.metric) for p in bench} == {
        (b, f"{ps}_time_13x13") for b in ("cuda", "dense", "flex", "natten") for ps in ("fwd", "fwd_bwd")}
    # Table 2 rows carry the paper's value (repro.paper), e.g. VAR-d16's 0.34 s
    ctx = _ctx(10)
    p = next(p for p in plan["table2_sample_fp32_var-d16"].planned if p.metric == "sample_time")
    assert ctx.row(p, 0.5).paper_value == pytest.approx(0.34)


def test_estimates_grow_with_depth_and_shrink_with_fp16() -> None:
    o = gpu_checks.PlanOptions()
    s = [gpu_checks.estimate_sample_s(f"var-d{d}", None, o) for d in (16, 20, 24)]
    t = [gpu_checks.estimate_train_s(f"var-d{d}", None, o) for d in (16, 20, 24)]
    assert s == sorted(s) and t == sorted(t)
    assert gpu_checks.estimate_train_s("var-d24", torch.float16, o) < t[-1]


# --- the checks' logic on the CPU ----------------------------------------------------------------


def _run_one(check: Check, ctx: Context) -> checkrun.RunResult:
    return run_checks([check], ctx)


def test_kernel_tests_check_counts_and_fails_loudly(tmp_path: Path) -> None:
    test_file = tmp_path / "test_fake_kernel.py"
    test_file.write_text(textwrap.dedent("""
        import pytest
        def test_passes(): assert True
        def test_mismatch(): assert 1.0 == 2.0, "cuda out mismatch: max abs err 0.5"
        def test_skipped(): pytest.skip("ptxas not on the PATH")
    """))
    ctx = Context(env=ENV, deadline=time.monotonic() + 120, extra={"out": tmp_path})
    check = gpu_checks.kernel_tests_check([str(test_file)], estimate_s=30, must_pass="fake_kernel")
    result = _run_one(check, ctx)
    by_metric = {r.metric: r for r in result.rows}
    assert by_metric["kernel_tests_passed"].value == 1
    assert by_metric["kernel_tests_skipped"].value == 1
    failed = by_metric["kernel_tests_failed"]
    assert failed.value == 1 and failed.status.startswith("fail: 1 failed")
    assert "test_mismatch" in failed.status and result.failed
    assert "mismatch" in (tmp_path / "kernel_tests.log").read_text()
    # all skipped (e.g. no usable backend) is a failure too, not a pass
    test_file.write_text("import pytest\ndef test_s(): pytest.skip('no cuda')\n")
    result = _run_one(gpu_checks.kernel_tests_check([str(test_file)], estimate_s=30), ctx)
    assert result.failed and "no kernel test passed" in result.rows[1].status
    # ... and so is a run where only the other files' tests passed (the device tests skipped)
    other = tmp_path / "test_other.py"
    other.write_text("def test_ptx(): assert True\n")
    check = gpu_checks.kernel_tests_check([str(test_file), str(other)], estimate_s=30,
                                          must_pass="test_fake_kernel")  # fmt: skip
    result = _run_one(check, ctx)
    assert result.rows[0].value == 1 and result.failed
    assert "no test of test_fake_kernel passed" in result.rows[1].status


def test_parse_junit(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text("""<testsuites><testsuite tests="3">
      <testcase classname="t" name="a"/>
      <testcase classname="t" name="b"><failure message="AssertionError: x&#10;more">tb</failure></testcase>
      <testcase classname="t" name="c"><skipped message="why"/></testcase>
      <testcase classname="t" name="d"><error message="fixture broke">tb</error></testcase>
    </testsuite></testsuites>""")
    s = gpu_checks.parse_junit(xml)
    assert (s.tests, s.passed, s.failed, s.skipped) == (4, 1, 2, 1) and s.passed_ids == ("t::a",)
    assert s.failing == ("t::b: AssertionError: x", "t::d: fixture broke")


@pytest.mark.slow
def test_parity_passes_for_the_same_model_and_fails_for_another() -> None:
    """The GPU-vs-CPU check run CPU-vs-CPU (another NA backend on the 'device' side): the
    stated tolerances hold for summation-order differences and catch a slightly wrong model."""
    r = gpu_checks.tiny_parity("mvar-tiny", "cpu", batch=2, na_backend="dense")
    assert r.teacher_forcing_ok and r.sampler_ok and r.tokens_agree == 1.0
    assert r.teacher_forcing_max_abs < gpu_checks.TEACHER_FORCING_TOL.atol / 10
    assert "dense" in r.backends
    bad = gpu_checks.tiny_parity("var-tiny", "cpu", batch=2, perturb=1e-4)
    assert not bad.teacher_forcing_ok and not bad.sampler_ok


def test_parity_check_rows(monkeypatch) -> None:
    res = gpu_checks.ParityResult(2e-6, True, 5e-2, False, 0.5, ("cuda", "numba"))
    monkeypatch.setattr(gpu_checks, "tiny_parity", lambda *a, **k: res)
    check = gpu_checks.parity_check("mvar-tiny", gpu_checks.PlanOptions(device="cpu"))
    result = _run_one(check, _ctx(100))
    rows = {r.metric: r for r in result.rows}
    assert rows["teacher_forcing_max_abs_diff"].status == "ok"
    assert rows["sampler_logits_max_abs_diff"].status.startswith("fail: beyond atol")
    assert rows["tokens_agree_fraction"].value == 0.5
    assert "[na2d: cuda, numba]" in rows["tokens_agree_fraction"].device and result.failed


def test_bench_check_on_the_cpu_measures_what_runs_and_says_why_not(monkeypatch) -> None:
    monkeypatch.setattr(gpu_checks, "natten_unavailable_reason", lambda: "natten is not installed")
    opts = gpu_checks.PlanOptions(device="cpu", bench_repeats=1)
    ctx = Context(env=ENV, deadline=time.monotonic() + 300)
    result = _run_one(gpu_checks.bench_check(2, 13, opts, estimate_s=8), ctx)
    rows = {(r.model, r.metric): r for r in result.rows}
    assert rows[("dense", "fwd_time_13x13")].value > 0
    assert rows[("dense", "fwd_bwd_time_13x13")].value > 0
    assert rows[("cuda", "fwd_time_13x13")].status.startswith("not measured: the cuda backend")
    assert rows[("natten", "fwd_time_13x13")].status == "not measured: natten is not installed"
    flex_bwd = rows[("flex", "fwd_bwd_time_13x13")].status
    assert flex_bwd.startswith("not measured:") and "backward" in flex_bwd  # no CPU backward
    assert not result.failed and len(result.rows) == 8


def _mem(alloc_mib: float, nvml_ok: bool = True) -> prof.CudaMemory:
    reading = (prof.NvmlReading("ok", 100 * 2**20, int((alloc_mib + 500) * 2**20), 7) if nvml_ok
               else prof.NvmlReading("not measured: nvidia-ml-py (pynvml) is not installed"))
    return prof.CudaMemory(int(alloc_mib * 2**20), int(2 * alloc_mib * 2**20), reading)


def _touch_na2d() -> None:
    from mvar.attention import na2d

    q = torch.zeros(1, 1, 4, 4, 2)
    na2d(q, q, q, 3, backend="dense")


def test_table2_sampling_cell_rows_over_fake_measurements(monkeypatch) -> None:
    calls: list[dict] = []

    def fake_time(preset, batch, **kw):
        calls.append(kw)
        _touch_na2d()
        return prof.Timing(0.5 if kw["decode"] else 0.25, 0.2, 0.6, 3, 1, "cuda", (0.5, 0.5, 0.5))

    def fake_mem(preset, batch, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_checks.compute, "time_sampling", fake_time)
    monkeypatch.setattr(gpu_checks.compute, "measure_inference_cuda", fake_mem)
    opts = gpu_checks.PlanOptions(device="cpu")
    check = gpu_checks.sample_check("mvar-finetune-d16", "mvar-d16", gpu_checks.FP16, opts)
    result = _run_one(check, _ctx(1000))
    rows = {r.metric: r for r in result.rows}
    assert rows["sample_time"].value == 0.5 and rows["sample_time_tokens"].value == 0.25
    assert rows["sample_time"].device == "cuda: Fake GPU [na2d: dense]"
    assert rows["sample_time"].dtype == "float32+autocast(float16)"
    assert all(c["autocast_dtype"] is torch.float16 and c["top_k"] == 900 for c in calls)
    mem = [r for m, r in rows.items() if m.startswith("inference_memory")]
    assert len(mem) == 5 and {r.status for r in mem} == {OOM}  # the OOM stayed in its step
    assert not result.failed and result.outcomes[0].outcome == "ok"

    monkeypatch.setattr(gpu_checks.compute, "measure_inference_cuda",
                        lambda *a, **k: {"tokens": _mem(3846, nvml_ok=False), "decode": _mem(5000),
                                         "total": _mem(6000)})  # fmt: skip
    result = _run_one(check, _ctx(1000))
    rows = {r.metric: r for r in result.rows}
    assert rows["inference_memory"].value == pytest.approx(3846)
    assert rows["inference_memory_reserved"].value == pytest.approx(2 * 3846)
    assert rows["inference_memory_total"].value == pytest.approx(6000)
    assert rows["inference_memory_nvml"].status.startswith("not measured: nvidia-ml-py")
    assert rows["inference_memory"].paper_value == pytest.approx(3846)  # Table 2's MVAR-d16†


def test_table2_training_cell_rows_over_fake_measurements(monkeypatch) -> None:
    def fake_mem(preset, batch, **kw):
        _touch_na2d()
        return {"0-7": _mem(1000), "8": _mem(3000), "9": _mem(2000)}

    def fake_time(preset, batch, **kw):
        chunks = {c: prof.Timing(t, t, t, 3, 1, "cuda") for c, t in (("0-7", 0.1), ("8", 0.2), ("9", 0.3))}
        return compute_timing(chunks)

    def compute_timing(chunks):
        from repro.compute import TrainTiming

        return TrainTiming("mvar-d16", 32, chunks, (8 * 0.1 + 0.2 + 0.3) / 10, "cuda", "0-7×8 8×1 9×1")

    monkeypatch.setattr(gpu_checks.compute, "measure_train_memory_cuda", fake_mem)
    monkeypatch.setattr(gpu_checks.compute, "time_train_step", fake_time)
    opts = gpu_checks.PlanOptions(device="cpu")
    check = gpu_checks.train_check("mvar-finetune-d16", "mvar-d16", gpu_checks.FP32, opts)
    rows = {r.metric: r for r in _run_one(check, _ctx(1000)).rows}
    assert rows["train_memory"].value == pytest.approx(3000)  # the max over the chunks
    assert rows["train_memory_reserved"].value == pytest.approx(6000)
    assert rows["train_memory_nvml"].value == pytest.approx(3500)
    assert rows["train_memory_chunk_0-7"].value == pytest.approx(1000)
    assert rows["train_step_time"].value == pytest.approx(0.13)
    assert rows["train_step_time_chunk_9"].value == pytest.approx(0.3)
    assert rows["train_memory"].device.endswith("[na2d: dense]")
    assert rows["train_step_time"].device.endswith("[na2d: none]")

    monkeypatch.setattr(gpu_checks.compute, "measure_train_memory_cuda",
                        lambda *a, **k: {"0-7": _mem(1000), "8": "oom", "9": _mem(2000)})
    rows = {r.metric: r for r in _run_one(check, _ctx(1000)).rows}
    assert rows["train_memory_chunk_8"].status == OOM and rows["train_memory"].status == OOM
    assert rows["train_memory_chunk_9"].value == pytest.approx(2000)


def test_table2_cell_stops_at_the_time_limit_between_steps(monkeypatch) -> None:
    clock = FakeClock()

    def slow_time(preset, batch, **kw):
        clock.sleep(1000)
        return prof.Timing(0.5, 0.5, 0.5, 3, 1, "cuda")

    monkeypatch.setattr(gpu_checks.compute, "time_sampling", slow_time)
    check = gpu_checks.sample_check("var-d16", "var-d16", gpu_checks.FP32,
                                    gpu_checks.PlanOptions(device="cpu"))  # fmt: skip
    result = _run_one(check, _ctx(check.estimate_s + 1, clock))
    rows = {r.metric: r.status for r in result.rows}
    assert rows["sample_time"] == "ok" and rows["inference_memory"] == TIME_LIMIT
    assert result.outcomes[0].outcome == "time limit" and not result.failed


def test_time_limit_reached_is_not_an_error() -> None:
    ctx = _ctx(5)
    with pytest.raises(TimeLimitReached, match="needs ~10 s, 5 s left"):
        ctx.guard(10, "x")


HANGING_RUN = """
import sys, time
from repro import gpu_check
from repro.checkrun import Check, Planned
from repro.report import Environment

planned = (Planned("t", "hang", "m", "s", "float32", 1),)
def run(ctx, emit):
    time.sleep(60)  # a hang: only the watchdog ends this

gpu_check.no_gpu_reason = lambda device: None
gpu_check.open_device = lambda device: (Environment("cuda: Fake", "float32", "t", "abc"), {})
gpu_check.build_plan = lambda opts: [Check("hang", "sleeps", planned, 0.5, run)]
sys.exit(gpu_check.main(["--out", sys.argv[1], "--time-limit", "4"]))
"""


def test_a_hanging_check_is_ended_by_the_watchdog_with_its_rows_written(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HANGING_RUN, str(tmp_path)], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 40  # ended at the 4 s limit, not after the 60 s hang
    assert [r["status"] for r in _read(tmp_path / "gpu_check.csv")] == [TIME_LIMIT]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["hard_stop"] is True and record["not_run"] == ["hang"]
    assert "watchdog" in (tmp_path / "gpu_check.log").read_text()
