"""Paper-size models at no cost: built on the meta device and given fake storage
(``FakeTensorMode``), so counting and memory estimates run in seconds on a CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mvar.config import ModelConfig, get_preset


def _config(cfg: ModelConfig | str) -> ModelConfig:
    return get_preset(cfg) if isinstance(cfg, str) else cfg


# Neighbourhood attention under fake tensors runs through the ``dense`` backend: SDPA with a
# 0/1 mask, which (like NATTEN's fused kernel on a GPU) materialises no per-query window copy;
# the ``reference`` backend would gather [B, H, l, k*k, c] keys and values and inflate MVAR's
# memory estimate.
FAKE_NA_BACKEND = "dense"


@dataclass
class FakeModels:
    """A transformer and VQ-VAE whose tensors are fake (``FakeTensorMode``, device cpu);
    run them inside ``fake_mode``."""

    fake_mode: Any
    model: nn.Module
    vae: nn.Module


def build_fake(
    cfg: ModelConfig | str, *, train: bool = False, na_backend: str = FAKE_NA_BACKEND
) -> FakeModels:
    """Paper-size models at no cost: built on the meta device, then given fake CPU storage
    (``to_empty`` inside ``FakeTensorMode``; fake "cuda" tensors abort a CPU build). Values are
    undefined; only shapes, dtypes and the sequence of ops are real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mvar.build import build_model, build_vqvae

    cfg = _config(cfg)
    model = build_model(cfg, device="meta", init=False, na_backend=na_backend)
    vae = build_vqvae(cfg.vae, device="meta")
    # empty_like(meta tensor, device="cpu") has a non-fake input; allow it only for this.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model.to_empty(device="cpu")
        vae.to_empty(device="cpu")
    fake_mode.allow_non_fake_inputs = False
    model.train(train)
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return FakeModels(fake_mode, model, vae)


def labels_for(batch: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.arange(batch, device=device) % 1000
