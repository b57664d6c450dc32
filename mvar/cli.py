"""``mvar`` command: one entry point, each subcommand a module with its own ``main``.

    mvar presets                       list model presets and released-checkpoint settings
    mvar sample   --model mvar-tiny    image grid + per-scale progression strip
    mvar train    --model mvar-tiny    train / fine-tune (``torchrun -m mvar.train`` for DDP)
    mvar train-vae --vae vae-tiny      train the multi-scale VQ-VAE tokenizer (``torchrun -m mvar.train_vae``)
    mvar generate ...                  50k-sample generation for FID (``torchrun -m mvar.generate``)
    mvar evaluate ...                  FID / IS / precision / recall / sFID of a sample set
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "sample": "mvar.visualize",
    "train": "mvar.train",
    "train-vae": "mvar.train_vae",
    "generate": "mvar.generate",
    "evaluate": "mvar.evaluate",
}


def _presets() -> None:
    from mvar.config import PRESETS, SAMPLING_PRESETS, VAE_PRESETS

    for name, cfg in sorted(PRESETS.items()):
        na = f" NA k={cfg.kernel_size} on scales>={cfg.refine_step}" if cfg.arch == "mvar" and cfg.spatial_markov else ""
        sys.stdout.write(f"{name:24s} {cfg.arch:4s} depth {cfg.depth:2d} width {cfg.embed_dim:4d} "
                         f"L {cfg.seq_len}{na}\n")  # fmt: skip
    sys.stdout.write("\ntokenizer presets (mvar train-vae --vae):\n")
    for name, v in VAE_PRESETS.items():
        sys.stdout.write(f"{name:24s} {v.image_size} px, V {v.vocab_size}, Cvae {v.Cvae}, "
                         f"ch {v.ch}x{v.ch_mult}, scales {v.patch_nums}\n")  # fmt: skip
    sys.stdout.write("\nreleased checkpoints (cfg / top_k / top_p):\n")
    for name, s in SAMPLING_PRESETS.items():
        sys.stdout.write(f"{name:24s} {s.cfg} / {s.top_k} / {s.top_p}\n")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ or "")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "presets":
        _presets()
        return
    if cmd not in COMMANDS:
        raise SystemExit(f"unknown command {cmd!r}; valid: presets, {', '.join(COMMANDS)}")
    importlib.import_module(COMMANDS[cmd]).main(rest)


if __name__ == "__main__":
    main()
