"""Comparing a module's state dict with a loaded one, for errors that list every problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

ShapeCheck = Callable[[str, tuple[int, ...], tuple[int, ...]], bool]


def state_dict_mismatch(
    module: nn.Module, sd: Mapping[str, Tensor], shape_ok: ShapeCheck | None = None
) -> list[str]:
    """Human-readable lines for every missing key, unexpected key and shape mismatch
    (expected vs found) between ``module``'s state dict and ``sd``; empty when they fit.
    ``shape_ok(key, expected, found)`` overrides the exact-shape rule where a buffer may vary."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = []
    for k, want in own.items():
        if k in sd:
            w, g = tuple(want.shape), tuple(sd[k].shape)
            if not (shape_ok(k, w, g) if shape_ok else w == g):
                mismatched.append(f"{k}: expected {w}, found {g}")
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    return lines
