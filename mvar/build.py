"""Build models from a preset name or a config: the one place that maps ``arch`` to a class."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mvar.config import ModelConfig, VQVAEConfig, get_preset
from mvar.vqvae import VQVAE

if TYPE_CHECKING:
    from baselines.var import VAR
    from mvar.model import MVAR


def build_model(
    cfg: ModelConfig | str,
    device: torch.device | str | None = None,
    *,
    init: bool = True,
    na_backend: str | None = None,
) -> VAR | MVAR:
    """A VAR or MVAR transformer for ``cfg`` (or a preset name such as ``"mvar-d16"``).

    ``device="meta"`` builds without allocating (parameter counts, FLOP counting). ``init``
    applies the official from-scratch initialisation (docs/var.md §2); loaders skip it.
    """
    from baselines.var import VAR
    from mvar.model import MVAR

    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    with torch.device(device or "cpu"):
        model: VAR | MVAR = VAR(cfg) if cfg.arch == "var" else MVAR(cfg, na_backend=na_backend)
    if init:
        model.init_weights()
    return model


def build_vqvae(cfg: VQVAEConfig, device: torch.device | str | None = None) -> VQVAE:
    with torch.device(device or "cpu"):
        return VQVAE(cfg)
