"""``mvar`` command: one entry point, each subcommand a module with its own ``main``.

    mvar presets                       list model presets and released-checkpoint settings
    mvar sample   --model mvar-tiny    image grid + per-scale progression strip
    mvar train    --model mvar-tiny    train / fine-tune (``torchrun -m mvar.train`` for DDP)
    mvar train-vae --vae vae-tiny      train the multi-scale VQ-VAE tokenizer (``torchrun -m mvar.train_vae``)
    mvar generate ...                  50k-sample generation for FID (``torchrun -m mvar.generate``)
    mvar evaluate ...                  FID / IS / precision / recall / sFID of a sample set

Errors print one line (what was wrong, what was expected, which file) and exit with status 1;
``mvar --debug <command> ...`` or ``MVAR_DEBUG=1`` shows the traceback and debug logs instead.
Under ``torchrun`` only rank 0 logs INFO lines (other ranks log warnings and errors), unless
debugging.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS = {
    "sample": "mvar.visualize",
    "train": "mvar.train",
    "train-vae": "mvar.train_vae",
    "generate": "mvar.generate",
    "evaluate": "mvar.evaluate",
}
DEBUG_ENV = "MVAR_DEBUG"
#: Longest error message printed (a state-dict mismatch can list hundreds of keys).
MAX_ERROR_CHARS = 2000


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def setup_logging() -> None:
    """Root logging for a command: INFO on rank 0, WARNING on the other ranks of a torchrun
    job (so each line appears once), DEBUG everywhere with ``$MVAR_DEBUG``; lines carry the
    rank in a multi-process job. Does nothing if logging is already configured."""
    rank = int(os.environ.get("RANK", "0"))
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if debug_enabled():
        level = logging.DEBUG
    else:
        level = logging.INFO if rank == 0 else logging.WARNING
    tag = f" [rank {rank}]" if multi else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(name)s{tag}: %(message)s")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message with line breaks joined, capped in length."""
    msg = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]  # KeyError's str() adds quotes
    msg = "; ".join(ln.strip() for ln in msg.splitlines() if ln.strip()) or type(exc).__name__
    if len(msg) > MAX_ERROR_CHARS:
        msg = msg[:MAX_ERROR_CHARS] + f" ... ({len(msg) - MAX_ERROR_CHARS} more characters)"
    return msg


def run_command(main: Callable[[list[str]], Any], name: str, argv: Sequence[str] | None = None) -> None:
    """Run a subcommand's ``main`` the way every entry point does: one-line errors with exit
    status 1 (tracebacks with ``$MVAR_DEBUG``), quiet exit on a closed pipe (``| head``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.stderr.write(f"mvar {name}: interrupted\n")
        raise SystemExit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as e:  # noqa: BLE001  (every error becomes one line; debug re-raises)
        if debug_enabled():
            raise
        sys.stderr.write(f"mvar {name}: error: {one_line(e)} (traceback: {DEBUG_ENV}=1 or "
                         "mvar --debug)\n")  # fmt: skip
        raise SystemExit(1) from None


def _quiet_broken_pipe() -> None:
    # The reader went away (`mvar presets | head`): stop without a traceback. Point stdout at
    # devnull so the interpreter's final flush does not raise again (Python docs, SIGPIPE).
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    raise SystemExit(0)


def _presets(argv: list[str]) -> None:
    from mvar.config import PRESETS, RELEASES, VAE_PRESETS

    for name, cfg in sorted(PRESETS.items()):
        na = f" NA k={cfg.kernel_size} on scales>={cfg.refine_step}" if cfg.arch == "mvar" and cfg.spatial_markov else ""
        sys.stdout.write(f"{name:24s} {cfg.arch:4s} depth {cfg.depth:2d} width {cfg.embed_dim:4d} "
                         f"L {cfg.seq_len}{na}\n")  # fmt: skip
    sys.stdout.write("\ntokenizer presets (mvar train-vae --vae):\n")
    for name, v in VAE_PRESETS.items():
        sys.stdout.write(f"{name:24s} {v.image_size} px, V {v.vocab_size}, Cvae {v.Cvae}, "
                         f"ch {v.ch}x{v.ch_mult}, scales {v.patch_nums}\n")  # fmt: skip
    sys.stdout.write("\nreleased checkpoints: file, architecture, guidance / top_k / top_p\n")
    for name, r in RELEASES.items():
        s = r.sampling
        sys.stdout.write(f"{name:24s} {r.file:24s} {r.preset:10s} {s.guidance} / {s.top_k} / "
                         f"{s.top_p}  {r.description}\n")  # fmt: skip
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] == "--debug":
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ or "")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "presets":
        run_command(_presets, cmd, rest)
        return
    if cmd not in COMMANDS:
        raise SystemExit(f"mvar: unknown command {cmd!r}; valid: presets, {', '.join(COMMANDS)}")
    setup_logging()
    run_command(importlib.import_module(COMMANDS[cmd]).main, cmd, rest)


if __name__ == "__main__":
    main()
