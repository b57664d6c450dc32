"""Everything that needs a GPU, in one unattended command with a time limit.

    python -m repro.gpu_check                  # or: nox -s gpu_check
    python -m repro.gpu_check --list           # the plan, with time estimates (no GPU needed)
    python -m repro.gpu_check --out $OUT --time-limit 8m --only 'kernel*' --only 'parity*'

On one GPU with random weights it runs, in this order (``repro/gpu_checks.py`` has the
details and the reasons for the order): the neighbourhood-attention kernel tests on the device
(the ``cuda`` backend against the fp64 reference, forward and backward, fp32/fp16/bf16), GPU vs
CPU logits at the tiny presets, Table 2's time and memory columns for VAR/MVAR d16-d24 at
batch 32 (fp32 and fp16 autocast; sampling and the training step under each model's
schedule; torch max-allocated, max-reserved and the NVML peak; the NA backend that ran), and
the na2d benchmark (cuda vs dense SDPA vs compiled flex, natten when installed) on Table 2's
workloads.

Output, in ``--out`` (default ``reports/gpu``), rewritten atomically after every check so that
a run killed at any point leaves a complete record:

* ``gpu_check.csv``: long-format rows (``repro.report.COLUMNS``), one per planned cell; a cell
  not reached says ``not measured: time limit`` (or why else), an out-of-memory cell ``oom``,
  a wrong result ``fail: ...``, a crashed measurement ``error: ...``;
* ``gpu_check.json``: the environment (GPU, driver, torch, CUDA, numba, which na2d backends
  can run and why not), each check's outcome with estimated and actual seconds, and details
  (per-call times, per-phase memory, failing tests);
* ``gpu_check.log`` (with tracebacks), ``gpu_check.md`` (tables from the CSV, when pandas is
  installed), ``kernel_tests.log`` and ``kernel_tests.xml`` (pytest's output and report).

Time: a check starts only if its estimate fits in what is left of ``--time-limit`` minus a
margin, and checks its budget between steps; later, cheaper checks may still run after one was
skipped. A watchdog ends the process at the limit itself (a hang, an estimate far off), after
writing the results, with exit status 0.

Exit status: 0 all that ran passed (cells may still be ``not measured: time limit`` or
``oom``); 1 a check found a wrong result or raised (the run stops there unless
``--keep-going``; everything up to it is written); 2 bad command line; 3 no CUDA device
(``gpu_check: no CUDA device ...`` on stderr, nothing written: run it on a GPU machine).
The command installs nothing: it runs in the current environment (torch with CUDA, and for
full coverage numba-cuda, pytest, hypothesis, nvidia-ml-py; pandas for the markdown). The
user's side of all this: ``docs/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import logging
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from repro import checkrun
from repro.checkrun import Check, CheckOutcome, Context, ResultRow, run_checks
from repro.gpu_checks import PlanOptions, build_plan, free_cuda_memory
from repro.report import Environment, capture_environment, write_csv

log = logging.getLogger("repro.gpu_check")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3
DEFAULT_TIME_LIMIT_S = 8 * 60.0
CSV_NAME, JSON_NAME, LOG_NAME, MD_NAME = "gpu_check.csv", "gpu_check.json", "gpu_check.log", "gpu_check.md"


def parse_duration(text: str) -> float:
    """``"480"``, ``"480s"``, ``"8m"``, ``"1.5m"`` -> seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([sm]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 480, 480s or 8m, got {text!r}")
    return float(m.group(1)) * (60.0 if m.group(2) == "m" else 1.0)


def margin_for(limit_s: float) -> float:
    """Seconds kept back from the checks' budget for a step that overruns its estimate and for
    writing the results: 10% of the limit, at least 5 s, at most 60 s (and at most half)."""
    return min(60.0, max(5.0, 0.1 * limit_s), 0.5 * limit_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.gpu_check",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 ok, 1 a check failed, 2 usage, 3 no CUDA device.")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("reports/gpu"), help="output folder (%(default)s)")
    p.add_argument("--time-limit", type=parse_duration, default=DEFAULT_TIME_LIMIT_S,
                   help="whole run, e.g. 480, 480s, 8m (default 8m)")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="batch of the Table 2 cells (%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per Table 2 cell (%(default)s)")
    p.add_argument("--device", default="cuda", help="CUDA device (%(default)s)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run only the checks whose name matches (repeatable; see --list)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="leave out the checks whose name matches (repeatable)")
    p.add_argument("--keep-going", action="store_true",
                   help="after a check raises, go on with the next ones (exit status still 1)")
    p.add_argument("--list", action="store_true", help="print the plan and exit (no GPU needed)")
    return p


def select(plan: Sequence[Check], only: Sequence[str], skip: Sequence[str]) -> list[Check]:
    """The checks of ``plan`` matching any ``only`` glob (all if none) and no ``skip`` glob;
    an ``only`` glob that matches nothing is an error (a typo would otherwise run nothing)."""
    for pat in only:
        if not any(fnmatch.fnmatchcase(c.name, pat) for c in plan):
            raise ValueError(f"--only {pat!r} matches no check; names: {', '.join(c.name for c in plan)}")
    return [c for c in plan
            if (not only or any(fnmatch.fnmatchcase(c.name, g) for g in only))
            and not any(fnmatch.fnmatchcase(c.name, g) for g in skip)]  # fmt: skip


def describe_plan(checks: Sequence[Check], limit_s: float) -> str:
    budget = limit_s - margin_for(limit_s)
    lines = [f"{'#':>3}  {'check':<44} {'est. s':>7} {'cum. s':>7}  rows  what"]
    cum = 0.0
    for i, c in enumerate(checks, 1):
        cum += c.estimate_s
        mark = "" if cum <= budget else "  (past the budget if all before it run)"
        lines.append(f"{i:>3}  {c.name:<44} {c.estimate_s:>7.0f} {cum:>7.0f} {len(c.planned):>5}  "
                     f"{c.summary}{mark}")  # fmt: skip
    lines.append(f"{len(checks)} checks, {sum(len(c.planned) for c in checks)} rows, estimated "
                 f"{cum:.0f} s; budget {budget:.0f} s of a {limit_s:.0f} s limit")  # fmt: skip
    return "\n".join(lines)


def no_gpu_reason(device: str) -> str | None:
    """Why this machine cannot run the GPU check, or None."""
    if torch.device(device).type != "cuda":
        return f"--device {device!r} is not a CUDA device"
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda})")  # fmt: skip
    idx = torch.device(device).index or 0
    if idx >= torch.cuda.device_count():
        return f"{device} does not exist ({torch.cuda.device_count()} CUDA device(s))"
    return None


def probe_environment(device: torch.device) -> dict[str, Any]:
    """What the JSON record says about where it ran (everything that changes the numbers)."""
    from mvar.attention import BACKENDS, backend_unavailable_reason
    from mvar.env import git_sha

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "git_sha": git_sha(), "argv": sys.argv,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }  # fmt: skip
    props = torch.cuda.get_device_properties(device)
    env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_mib": props.total_memory // 2**20,
                  "multiprocessors": props.multi_processor_count}  # fmt: skip
    for pkg in ("numba", "numba_cuda", "natten", "pynvml", "pytest", "hypothesis", "pandas", "triton"):
        env[f"has_{pkg}"] = importlib.util.find_spec(pkg) is not None
    try:
        import numba

        env["numba"] = numba.__version__
    except ImportError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001  (NVML missing or refusing: say so, go on)
        env["driver"] = f"unknown ({type(exc).__name__}: {exc})"
    env["na2d_backends"] = {
        name: {"fwd": backend_unavailable_reason(name, device, torch.float32) or "ok",
               "fwd_bwd": backend_unavailable_reason(name, device, torch.float32, True) or "ok"}
        for name in BACKENDS
    }  # fmt: skip
    return env


def open_device(device: str) -> tuple[Environment, dict[str, Any]]:
    """Make ``device`` current; the rows' environment and the JSON record's probe."""
    dev = torch.device(device)
    torch.cuda.set_device(dev)
    return capture_environment(dev, torch.float32), probe_environment(dev)


class Recorder:
    """Writes the CSV and the JSON record (atomically) whenever the runner reports progress,
    and once more, marked, if the watchdog stops the run."""

    def __init__(self, out: Path, ctx: Context, record: dict[str, Any]) -> None:
        self.out, self.ctx, self.record = out, ctx, record
        self.rows: list[ResultRow] = []
        self.outcomes: list[CheckOutcome] = []
        self.pending: list[Check] = []

    def progress(self, rows: list[ResultRow], outcomes: list[CheckOutcome], pending: list[Check]) -> None:
        self.rows, self.outcomes, self.pending = rows, outcomes, pending
        self.write(checkrun.pending_rows(self.ctx, pending))

    def write(self, pending_rows: list[ResultRow], **extra: Any) -> None:
        from mvar.io import atomic_write_json

        write_csv(self.rows + pending_rows, self.out / CSV_NAME)
        self.record.update(extra)
        self.record["checks"] = [asdict(o) for o in self.outcomes]
        self.record["not_run"] = [c.name for c in self.pending]
        self.record["details"] = self.ctx.details
        atomic_write_json(self.out / JSON_NAME, _jsonable(self.record))

    def hard_stop(self) -> None:
        """The watchdog's last word: what did not finish is ``not measured: time limit``."""
        log.warning("watchdog: the time limit was reached inside %s; writing what there is",
                    self.pending[0].name if self.pending else "the run")  # fmt: skip
        self.write(checkrun.pending_rows(self.ctx, self.pending, checkrun.TIME_LIMIT),
                   hard_stop=True, exit_code=EXIT_OK)  # fmt: skip
        write_markdown_if_possible(self.out)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def write_markdown_if_possible(out: Path) -> None:
    if importlib.util.find_spec("pandas") is None:
        log.info("pandas is not installed: no %s (the CSV has everything)", MD_NAME)
        return
    from repro.report import write_markdown

    note = (f"Rows from `python -m repro.gpu_check`; details and timings per check in "
            f"`{JSON_NAME}`, the log in `{LOG_NAME}`.")  # fmt: skip
    write_markdown(out / CSV_NAME, out / MD_NAME, title="GPU check", notes=(note,))


def setup_logging(out: Path) -> list[logging.Handler]:
    """INFO to stderr, DEBUG (tracebacks included) to ``<out>/gpu_check.log``; returns the
    handlers (``main`` removes them when it returns)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler()
    console.setLevel(logging.INFO)
    out.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(out / LOG_NAME, mode="w")
    file.setLevel(logging.DEBUG)
    for h in (console, file):
        h.setFormatter(fmt)
        root.addHandler(h)
    for noisy in ("numba", "torch._dynamo", "torch._inductor", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return [console, file]


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.monotonic()
    args = build_parser().parse_args(argv)
    opts = PlanOptions(batch=args.batch, repeats=args.repeats, device=args.device)
    try:
        if args.batch < 1 or args.repeats < 1:
            raise ValueError(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}")
        checks = select(build_plan(opts), args.only, args.skip)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        print(describe_plan(checks, args.time_limit))
        return EXIT_OK
    reason = no_gpu_reason(args.device)
    if reason is not None:
        print(f"gpu_check: no CUDA device ({reason}); nothing measured, nothing written. "
              "Run it on a GPU machine (`--list` shows the plan).", file=sys.stderr)  # fmt: skip
        return EXIT_NO_GPU

    out: Path = args.out
    handlers = setup_logging(out)
    try:
        return _run(args, checks, out, t_start)
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def _run(args: argparse.Namespace, checks: list[Check], out: Path, t_start: float) -> int:
    from mvar.io import remove_stale_temps

    remove_stale_temps(out)
    for stale in ("kernel_tests.xml", "kernel_tests.log", MD_NAME):
        (out / stale).unlink(missing_ok=True)  # a previous run's files must not pass for this one's
    limit = args.time_limit
    margin = margin_for(limit)
    env, probe = open_device(args.device)
    ctx = Context(env=env, deadline=t_start + limit - margin, extra={"out": out})
    record: dict[str, Any] = {"environment": probe, "time_limit_s": limit,
                              "margin_s": margin, "plan": [{"name": c.name, "estimate_s": round(c.estimate_s, 1),
                                                            "rows": len(c.planned)} for c in checks],
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    log.info("gpu_check on %s; %d checks, limit %.0f s (budget %.0f s); output in %s",
             env.device, len(checks), limit, limit - margin, out)  # fmt: skip
    log.info("environment: %s", json.dumps(record["environment"], default=str))
    log.info("plan:\n%s", describe_plan(checks, limit))
    recorder = Recorder(out, ctx, record)
    watchdog = checkrun.Watchdog(t_start + limit - time.monotonic(), recorder.hard_stop).start()
    try:
        result = run_checks(checks, ctx, keep_going=args.keep_going, on_progress=recorder.progress,
                            after_check=lambda _c: free_cuda_memory())  # fmt: skip
    finally:
        watchdog.cancel()
    code = EXIT_FAILED if result.failed else EXIT_OK
    recorder.write([], exit_code=code, elapsed_s=round(time.monotonic() - t_start, 1),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip
    try:
        write_markdown_if_possible(out)
    except Exception:  # noqa: BLE001  (the CSV and JSON are the record; the markdown is a view)
        log.exception("writing %s failed", MD_NAME)
    counts: dict[str, int] = {}
    for o in result.outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    log.info("done in %.0f s: %s; results in %s", time.monotonic() - t_start,
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), out / CSV_NAME)  # fmt: skip
    for f in result.failures:
        log.error("FAILED %s", f)
    return code


if __name__ == "__main__":
    sys.exit(main())
