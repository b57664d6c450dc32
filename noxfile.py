"""Sessions: ``nox -s tests`` (default), one ``repro_*`` session per paper table/figure,
``bench`` for the kernel, model-step and sampling benchmarks, ``gpu_check`` for everything that needs a
GPU, ``lint``.

Every session installs the project with its ``dev`` extra into its own virtualenv, reused on
later runs (torch is large). Arguments after ``--`` go to the underlying command.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite on CPU (the CUDA kernel runs under numba's simulator)."""
    _install(session)
    # Exit code 5 (no test collected) is a failure here, not a pass.
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def repro_table1(session: nox.Session) -> None:
    """Table 1. Default: the embedded study (repro.embedded: trained tokenizer and evaluator,
    VAR-tiny vs MVAR-tiny vs MVAR†-tiny vs the scale-Markov ablation on generated shapes, CPU,
    <= 10 minutes on 2 cores; reports/embedded/) next to the paper-scale rows, which are measured
    when the checkpoints, Inception weights and ADM reference batch are found and otherwise say
    which file is missing (``-- --help`` for the options; ``-- --embedded --study long`` for
    the longer study)."""
    _install(session)
    session.run("python", "-m", "repro.table1", *(session.posargs or ["--embedded"]))


def _repro(session: nox.Session, module: str) -> None:
    _install(session)
    session.run("python", "-m", f"repro.{module}", "--out", "reports", *session.posargs)


@nox.session
def repro_table2(session: nox.Session) -> None:
    """Table 2 compute columns: FLOPs, KV cache, memory, latency, training step."""
    _repro(session, "table2")


@nox.session
def repro_ablation(session: nox.Session) -> None:
    """The ablation: VAR, + scale-Markov, + spatial-Markov (MVAR), d16."""
    _repro(session, "ablation")


@nox.session
def repro_figures(session: nox.Session) -> None:
    """Figures drawn from the report CSVs, plus a sample grid and a per-scale progression."""
    _repro(session, "figures")


@nox.session
def repro_attention(session: nox.Session) -> None:
    """Where the attention goes (per key scale, per spatial distance): CSV, figures and markdown
    in reports/attention/. Default: the embedded study's trained VAR-tiny on its held-out images
    (trained first if the cache has none); pass
    ``-- --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth --images <dir>
    --device cuda`` for paper scale (``-- --help``)."""
    _install(session)
    session.run("python", "-m", "repro.attention_analysis", "--out", "reports",
                *(session.posargs or ["--embedded", "--model", "var-tiny"]))  # fmt: skip


@nox.session
def bench(session: nox.Session) -> None:
    """The pytest-benchmark suites, one after the other (never in parallel: they time the
    machine); each writes reports/bench/<suite>.json and its long-format <suite>.csv."""
    _install(session)
    Path("reports/bench").mkdir(parents=True, exist_ok=True)
    for suite in ("na2d", "model_steps", "sampling"):
        json_path = f"reports/bench/{suite}.json"
        session.run("python", "-m", "pytest", f"bench/bench_{suite}.py",
                    "--benchmark-json", json_path, *session.posargs)  # fmt: skip
        session.run("python", "-m", "bench.to_csv", json_path, f"reports/bench/{suite}.csv")


@nox.session(venv_backend="none")
def gpu_check(session: nox.Session) -> None:
    """Everything that needs a GPU in one unattended run of at most 8 minutes (``--time-limit``):
    kernel tests on the device, GPU vs CPU logits, Table 2's time and memory columns, the na2d
    benchmark; rows, JSON and log in ``reports/gpu/`` (``-- --help``, ``-- --list`` for the
    plan). Runs in the current environment, installing nothing (a GPU machine's own CUDA build
    of torch; see the README's "GPU check"). Exits 3 at once without a CUDA device."""
    session.run("python", "-m", "repro.gpu_check", *session.posargs, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "mvar", "baselines", "repro", "bench", "tests")
