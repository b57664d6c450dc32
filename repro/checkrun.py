"""Run a plan of measurement checks under a time limit; every planned row gets an outcome.

The machinery of ``python -m repro.gpu_check`` (the checks themselves are in
``repro/gpu_checks.py``), kept free of CUDA so that all of it is tested on a CPU with a fake
clock:

* A :class:`Check` declares, before it runs, the rows it will produce (:class:`Planned`: table,
  model, metric, unit, dtype, batch) and how long it expects to take (``estimate_s``). Its
  ``run(ctx, emit)`` emits :class:`~repro.report.ResultRow` s for planned rows only.
* :func:`run_checks` runs the checks in plan order. A check starts only if its estimate fits in
  what is left of the budget; otherwise its rows say ``not measured: time limit`` and the next
  (cheaper) check is considered. Inside, a check calls ``ctx.guard(seconds, what)`` before
  each expensive step; past the budget that raises :class:`TimeLimitReached`.
* However a check ends, each of its planned rows ends up with exactly one row: the ones it
  emitted, and for the rest ``not measured: time limit`` (:class:`TimeLimitReached`), ``oom``
  (CUDA or host out of memory), or ``error: <exception>`` (anything else: the run is marked
  failed and, unless ``keep_going``, stops; the later checks' rows then say why they were not
  reached). An emitted row whose status starts with ``fail:`` (a wrong result) or ``error:``
  (one cell of a check raised, and the check went on) marks the run failed too; the run goes
  on.
* After every check the caller's ``on_progress`` gets the rows so far, with the checks not yet
  run as ``not measured: not reached ...`` rows, so a run killed at any point leaves a complete
  CSV (see ``repro.gpu_check``). A :class:`Watchdog` ends the process at the hard limit if a
  step overruns its guard (a hang, an estimate far off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from repro.report import Environment, ResultRow, make_row

log = logging.getLogger(__name__)

TIME_LIMIT = "not measured: time limit"
OOM = "oom"
NOT_REACHED = "not measured: not reached (the run ended before this check: killed, or still running)"
FAIL_PREFIX = "fail:"
ERROR_PREFIX = "error:"

Key = tuple[str, str, str, str, int | None]  # (table, model, metric, dtype, batch)


@dataclass(frozen=True)
class Planned:
    """One row a check promises: its identity (``key``) and unit."""

    table: str
    model: str
    metric: str
    unit: str
    dtype: str
    batch: int | None = None

    @property
    def key(self) -> Key:
        return (self.table, self.model, self.metric, self.dtype, self.batch)


def row_key(row: ResultRow) -> Key:
    return (row.table, row.model, row.metric, row.dtype, row.batch)


class TimeLimitReached(Exception):
    """Raised by :meth:`Context.guard` when the next step would not fit in the budget."""


class PlanMismatch(RuntimeError):
    """A check emitted a row it did not plan, or the same row twice (a bug in the check)."""


@dataclass
class Context:
    """What a running check sees: the environment of its rows, the clock and the budget.

    ``deadline`` is the clock time by which checks must be done (the soft budget; the watchdog
    allows a margin on top). ``details`` collects per-check JSON-able facts for the run's JSON
    record (``ctx.details[name] = {...}``).
    """

    env: Environment
    deadline: float
    clock: Callable[[], float] = time.monotonic
    details: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what the checks share (device, paths)

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def guard(self, need_s: float, what: str) -> None:
        """Raise :class:`TimeLimitReached` unless ``need_s`` seconds are left for ``what``."""
        left = self.remaining()
        if left < need_s:
            raise TimeLimitReached(f"{what}: needs ~{need_s:.0f} s, {max(left, 0):.0f} s left")

    def row(self, p: Planned, value: float | None, *, method: str = "measured",
            status: str = "ok", device: str | None = None) -> ResultRow:  # fmt: skip
        """A result row for planned row ``p`` in this run's environment."""
        return make_row(self.env, p.table, p.model, p.metric, value, method=method, unit=p.unit,
                        status=status, batch=p.batch, device=device, dtype=p.dtype)  # fmt: skip


Emit = Callable[[ResultRow], None]


@dataclass(frozen=True)
class Check:
    """A unit of the plan: name, one line of what it measures, its planned rows, its time
    estimate (seconds on the target GPU) and ``run(ctx, emit)``."""

    name: str
    summary: str
    planned: tuple[Planned, ...]
    estimate_s: float
    run: Callable[[Context, Emit], None]

    def __post_init__(self) -> None:
        keys = [p.key for p in self.planned]
        if not keys:
            raise ValueError(f"check {self.name!r} plans no rows")
        if len(set(keys)) != len(keys):
            raise ValueError(f"check {self.name!r} plans a row twice")
        if not self.estimate_s > 0:
            raise ValueError(f"check {self.name!r}: estimate_s must be > 0")


def status_rows(ctx: Context, planned: Iterable[Planned], status: str) -> list[ResultRow]:
    """Rows without a value for ``planned``, all with ``status``."""
    return [ctx.row(p, None, method="none", status=status) for p in planned]


def validate_plan(checks: Sequence[Check]) -> None:
    """Names and planned rows are unique across the plan (each row has one owner)."""
    names = [c.name for c in checks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"check names repeat: {sorted(dup)}")
    seen: dict[Key, str] = {}
    for c in checks:
        for p in c.planned:
            if p.key in seen:
                raise ValueError(f"row {p.key} is planned by {seen[p.key]!r} and {c.name!r}")
            seen[p.key] = c.name


@dataclass
class CheckOutcome:
    """How one check ended: ``ok``, ``fail`` (a row says a result is wrong), ``time limit``,
    ``oom``, ``error`` or ``skipped`` (not started: over budget, or after a fatal error)."""

    name: str
    outcome: str
    estimate_s: float
    elapsed_s: float = 0.0
    message: str = ""


@dataclass
class RunResult:
    rows: list[ResultRow]
    outcomes: list[CheckOutcome]
    failed: bool  # a wrong result or an unexpected error: the command exits non-zero
    stopped_early: bool = False  # an error ended the run before the plan did

    @property
    def failures(self) -> list[str]:
        return [f"{r.table}/{r.model}/{r.metric}: {r.status}" for r in self.rows
                if r.status.startswith((FAIL_PREFIX, ERROR_PREFIX))]  # fmt: skip


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))


def pending_rows(ctx: Context, checks: Sequence[Check], status: str = NOT_REACHED) -> list[ResultRow]:
    return [r for c in checks for r in status_rows(ctx, c.planned, status)]


def run_checks(
    checks: Sequence[Check],
    ctx: Context,
    *,
    keep_going: bool = False,
    on_progress: Callable[[list[ResultRow], list[CheckOutcome], list[Check]], None] | None = None,
    after_check: Callable[[Check], None] | None = None,
) -> RunResult:
    """Run ``checks`` in order within ``ctx.deadline`` (module docstring).

    ``on_progress(rows, outcomes, pending)`` is called before the first check and after each
    one with the rows and outcomes so far and the checks not yet run (the caller writes them,
    e.g. with :func:`pending_rows`); ``after_check`` (e.g. freeing GPU memory) after each
    check, whatever its outcome."""
    validate_plan(checks)
    rows: list[ResultRow] = []
    outcomes: list[CheckOutcome] = []
    failed = stopped = False

    def progress(i: int) -> None:
        if on_progress is not None:
            on_progress(list(rows), list(outcomes), list(checks[i:]))

    progress(0)
    for i, check in enumerate(checks):
        if stopped:
            reason = _stopped_reason(outcomes)
            rows += status_rows(ctx, check.planned, reason)
            outcomes.append(CheckOutcome(check.name, "skipped", check.estimate_s, message=reason))
            continue
        left = ctx.remaining()
        if left < check.estimate_s:
            log.info("skip %s: needs ~%.0f s, %.0f s left", check.name, check.estimate_s, max(left, 0))
            rows += status_rows(ctx, check.planned, TIME_LIMIT)
            outcomes.append(CheckOutcome(check.name, "skipped", check.estimate_s,
                                         message=f"needs ~{check.estimate_s:.0f} s, "
                                         f"{max(left, 0):.0f} s left"))  # fmt: skip
            progress(i + 1)
            continue
        log.info("[%d/%d] %s: %s (estimate %.0f s, %.0f s left)", i + 1, len(checks), check.name,
                 check.summary, check.estimate_s, left)  # fmt: skip
        emitted: dict[Key, ResultRow] = {}
        planned = {p.key: p for p in check.planned}

        def emit(row: ResultRow, planned=planned, emitted=emitted, name=check.name) -> None:
            key = row_key(row)
            if key not in planned:
                raise PlanMismatch(f"check {name!r} emitted an unplanned row {key}")
            if key in emitted:
                raise PlanMismatch(f"check {name!r} emitted row {key} twice")
            emitted[key] = row
            if row.status.startswith(FAIL_PREFIX):
                log.error("FAIL %s/%s/%s: %s", row.table, row.model, row.metric, row.status)

        t0 = ctx.clock()
        outcome, message, rest_status = "ok", "", ""
        try:
            check.run(ctx, emit)
        except TimeLimitReached as exc:
            outcome, message, rest_status = "time limit", str(exc), TIME_LIMIT
            log.warning("%s stopped at the time limit: %s", check.name, exc)
        except Exception as exc:  # noqa: BLE001  (every failure of a check becomes rows)
            if is_oom(exc):
                outcome, message, rest_status = "oom", _one_line(exc), OOM
                log.warning("%s ran out of memory: %s", check.name, _one_line(exc))
            else:
                outcome, message = "error", f"{type(exc).__name__}: {_one_line(exc)}"
                rest_status = f"{ERROR_PREFIX} {message}"[:500]
                log.error("%s raised %s (traceback follows)", check.name, message)
                log.debug("traceback of %s:\n%s", check.name, traceback.format_exc())
                failed = True
                stopped = not keep_going
        elapsed = ctx.clock() - t0
        missing = [p for k, p in planned.items() if k not in emitted]
        if outcome == "ok" and missing:  # returned without emitting all its rows: a bug
            outcome, failed = "error", True
            message = f"returned without {len(missing)} planned row(s), e.g. {missing[0].key}"
            rest_status = f"{ERROR_PREFIX} check {message}"
            log.error("%s %s", check.name, message)
        # planned order, whatever order the check emitted in
        rows += [emitted[p.key] for p in check.planned if p.key in emitted]
        rows += status_rows(ctx, missing, rest_status)
        if any(r.status.startswith((FAIL_PREFIX, ERROR_PREFIX)) for r in emitted.values()):
            failed = True
            if outcome == "ok":
                outcome = "fail"
        outcomes.append(CheckOutcome(check.name, outcome, check.estimate_s, elapsed, message))
        log.info("%s: %s in %.1f s (estimate %.0f s)%s", check.name, outcome, elapsed,
                 check.estimate_s, f": {message}" if message else "")  # fmt: skip
        if after_check is not None:
            after_check(check)
        progress(i + 1)
    progress(len(checks))
    return RunResult(rows, outcomes, failed, stopped)


def _stopped_reason(outcomes: Sequence[CheckOutcome]) -> str:
    culprit = next((o.name for o in reversed(outcomes) if o.outcome == "error"), "a check")
    return f"not measured: run stopped after {culprit} raised an error"


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return (msg or type(exc).__name__)[:300]


class Watchdog:
    """Ends the process at a hard limit: runs ``on_fire()`` (write what there is) from a timer
    thread, waiting for it at most ``write_timeout_s`` (it must not hang the exit itself), then
    ``exit_fn(code)`` (``os._exit``: the main thread may be stuck in a kernel or a hang).
    ``cancel()`` when the run finishes in time."""

    def __init__(self, seconds: float, on_fire: Callable[[], None], *, code: int = 0,
                 exit_fn: Callable[[int], None] = os._exit, write_timeout_s: float = 30.0) -> None:  # fmt: skip
        self.fired = threading.Event()
        self._on_fire, self._exit, self._code = on_fire, exit_fn, code
        self._write_timeout = write_timeout_s
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

    def start(self) -> Watchdog:
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.cancel()

    def _write(self) -> None:
        try:
            self._on_fire()
        except Exception:  # noqa: BLE001  (still exit: a hung run must end)
            log.exception("watchdog: writing the partial results failed")

    def _fire(self) -> None:
        self.fired.set()
        writer = threading.Thread(target=self._write, name="watchdog-write", daemon=True)
        writer.start()
        writer.join(self._write_timeout)
        if writer.is_alive():
            log.error("watchdog: writing the results took over %.0f s; exiting anyway",
                      self._write_timeout)  # fmt: skip
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):  # a broken handler must not stop the exit
                h.flush()
        self._exit(self._code)
