"""Shared pytest fixtures.

``parity_fixtures``: every parity file (``format == 'mvar-parity-fixture/1'``, schema in
``docs/parity.md`` §2) in the directory named by ``$MVAR_PARITY_FIXTURES``
(default ``<repo>/../shared/fixtures``), loaded once per session. A missing fixture is a
failure, not a skip: parity is the project's main correctness claim. ``parity_models``: each
fixture with its VQ-VAE and VAR / MVAR transformers built and loaded, once per session.
``tiny_vae``: the seeded random-init VQ-VAE of the tiny presets, once per test module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mvar.config import ModelConfig, VQVAEConfig

PARITY_FORMAT = "mvar-parity-fixture/1"
REPO_ROOT = Path(__file__).resolve().parents[1]


def parity_fixture_dir() -> Path:
    env = os.environ.get("MVAR_PARITY_FIXTURES")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


def load_parity_fixtures(directory: Path) -> list[dict[str, Any]]:
    """All ``*.pt`` parity files in ``directory`` (sorted by name), each with ``_path`` added."""
    found: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.pt")):
        data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, dict) and data.get("format") == PARITY_FORMAT:
            data["_path"] = str(path)
            found.append(data)
    return found


@pytest.fixture(scope="session")
def parity_fixtures() -> list[dict[str, Any]]:
    directory = parity_fixture_dir()
    fixtures = load_parity_fixtures(directory) if directory.is_dir() else []
    if not fixtures:
        pytest.fail(
            f"no parity fixture (*.pt with format == {PARITY_FORMAT!r}) found in {directory} "
            f"(exists: {directory.is_dir()}); set MVAR_PARITY_FIXTURES to the folder holding "
            "upstream_tiny.pt"
        )
    return fixtures


def fixture_configs(c: dict[str, Any]) -> tuple[VQVAEConfig, dict[str, ModelConfig]]:
    """The VQ-VAE config and the VAR / MVAR transformer configs recorded in a parity
    fixture's ``config`` (schema in ``docs/parity.md`` §2)."""
    vae = VQVAEConfig(
        vocab_size=c["vocab_size"],
        Cvae=c["Cvae"],
        ch=c["vae_ch"],
        ch_mult=tuple(c["vae_ch_mult"]),
        num_res_blocks=c.get("vae_num_res_blocks", 2),
        share_quant_resi=c["share_quant_resi"],
        quant_resi=c["quant_resi"],
        patch_nums=tuple(c["patch_nums"]),
    )
    models = {
        arch: ModelConfig(
            name=f"fixture-{arch}",
            arch=arch,  # type: ignore[arg-type]
            depth=c["depth"],
            embed_dim=c["embed_dim"],
            num_heads=c["num_heads"],
            mlp_ratio=c["mlp_ratio"],
            num_classes=c["num_classes"],
            attn_l2_norm=c["attn_l2_norm"],
            shared_aln=c["shared_aln"],
            norm_eps=c["norm_eps"],
            kernel_size=c["mvar_kernel_size"],
            refine_step=c["mvar_refine_step"],
            vae=vae,
        )
        for arch in ("var", "mvar")
    }
    return vae, models


@pytest.fixture(scope="session")
def parity_models(
    parity_fixtures: list[dict[str, Any]],
) -> list[tuple[dict[str, Any], torch.nn.Module, dict[str, torch.nn.Module]]]:
    """(fixture, vae, {"var": model, "mvar": model}) per fixture, in eval mode; sampling and
    forwards keep no state on the modules, so the tests share them."""
    from mvar.build import build_model, build_vqvae
    from mvar.checkpoint import load_transformer_state_dict
    from mvar.vqvae import load_vqvae_state_dict

    out = []
    for fx in parity_fixtures:
        vae_cfg, model_cfgs = fixture_configs(fx["config"])
        vae = build_vqvae(vae_cfg)
        load_vqvae_state_dict(vae, fx["vae_state_dict"], fx["_path"])
        models = {}
        for arch, cfg in model_cfgs.items():
            model = build_model(cfg, init=False)
            load_transformer_state_dict(model, fx["transformer_state_dict"], fx["_path"])
            models[arch] = model.eval()
        out.append((fx, vae.eval(), models))
    return out


@pytest.fixture(scope="module")
def tiny_vae() -> torch.nn.Module:
    from mvar.build import build_vqvae
    from mvar.config import get_preset

    torch.manual_seed(0)
    return build_vqvae(get_preset("var-tiny").vae).eval()
