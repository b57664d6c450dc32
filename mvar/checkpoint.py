"""Finding, reading and loading the official checkpoints (and our own).

Formats accepted (docs/var.md §2, docs/mvar.md §4):

* VAR's released ``var_d16.pth`` … ``var_d30.pth``: a plain state dict.
* MVAR's released ``mvar-d16.pth``, ``mvar-finetune-d16/20/24.pth``: ``{'mvar_wo_ddp': sd}``.
* training checkpoints: ``{'trainer': {'var_wo_ddp': sd}}`` or ``{'trainer': {'mvar_wo_ddp': sd}}``
  (also our own trainer's files, which use the same layout).
* the VQ-VAE ``vae_ch160v4096z32.pth``: a plain state dict.

Every file is read with ``torch.load(weights_only=True)`` (``mvar.io.safe_torch_load``): a checkpoint is untrusted input.
Errors name the file, what was wrong and what was expected; a missing file also says where we
looked and where to download it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mvar.build import build_model, build_vqvae
from mvar.config import CHECKPOINT_PRESETS, RELEASES, ModelConfig, VQVAEConfig, get_preset
from mvar.io import UnsafeOrUnreadableFile, safe_torch_load
from mvar.statedict import state_dict_mismatch
from mvar.vqvae import VQVAE, load_vqvae_state_dict

logger = logging.getLogger(__name__)

VAR_HUB = "https://huggingface.co/FoundationVision/var/resolve/main/"
MVAR_HUB = "https://huggingface.co/CVLUESTC/MVAR/resolve/main/"
#: The official VQ-VAE file (docs/var.md §1).
VAE_FILE = "vae_ch160v4096z32.pth"
#: The file of each released transformer checkpoint, by its name (a view of ``mvar.config.RELEASES``).
CHECKPOINT_FILES: dict[str, str] = {n: r.file for n, r in RELEASES.items()}
#: Where each official file comes from: the one registry of files and addresses.
DOWNLOADS: dict[str, str] = {
    VAE_FILE: VAR_HUB + VAE_FILE,
    **{f: (VAR_HUB if f.startswith("var_") else MVAR_HUB) + f for f in CHECKPOINT_FILES.values()},
}
#: Directories searched for a bare file name, after the current directory.
CHECKPOINT_DIR_ENV = "MVAR_CHECKPOINT_DIR"


class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be used."""


def checkpoint_dirs() -> list[Path]:
    dirs = [Path.cwd()]
    env = os.environ.get(CHECKPOINT_DIR_ENV)
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path.cwd() / "checkpoints", Path.cwd() / "pretrained"]
    return dirs


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The file ``path`` names: as given, or a bare name looked up in :func:`checkpoint_dirs`.

    Raises ``FileNotFoundError`` that says which file, every place looked, and where to get it.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise CheckpointError(
            f"checkpoint {p} is a directory; expected a .pth file (e.g. {p / 'last.pth'})"
        )
    looked = [p.resolve()]
    if not p.is_absolute() and len(p.parts) == 1:
        for d in checkpoint_dirs():
            cand = d / p
            if cand.is_file():
                return cand
            looked.append(cand.resolve())
    where = DOWNLOADS.get(p.name)
    hint = (
        f"download it from {where}"
        if where
        else "pass the path of an existing checkpoint (official names: "
        + ", ".join(sorted(DOWNLOADS))
        + ")"
    )
    raise FileNotFoundError(
        f"checkpoint file {p.name!r} not found; looked at: "
        + ", ".join(str(x) for x in dict.fromkeys(looked))
        + f" (set ${CHECKPOINT_DIR_ENV} to add directories); {hint}"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` of a resolved file, with errors that say why."""
    p = resolve_checkpoint(path)
    try:
        return safe_torch_load(p, "checkpoint")
    except UnsafeOrUnreadableFile as e:
        raise CheckpointError(str(e)) from None


#: Key prefixes of a VQ-VAE state dict (``mvar.vqvae.VQVAE``), to recognise one passed where a
#: transformer was expected.
_VQVAE_KEY_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def looks_like_vqvae(sd: Mapping[str, Any]) -> bool:
    keys = [k for k in sd if isinstance(k, str)]
    return bool(keys) and sum(k.startswith(_VQVAE_KEY_PREFIXES) for k in keys) > len(keys) // 2


def warn_non_finite(sd: Mapping[str, Tensor], source: str) -> list[str]:
    """Log a warning naming the tensors of ``sd`` holding NaN or inf; returns their names.
    (A warning, not an error: a diverged run's last checkpoint is still worth inspecting.)"""
    def broken(k: str, v: Tensor) -> bool:
        # The attention mask is an additive 0 / -inf buffer (rebuilt on load anyway): only a
        # NaN is wrong there; anywhere else any non-finite value is.
        if k.endswith("attn_bias_for_masking"):
            return bool(torch.isnan(v).any())
        return not bool(torch.isfinite(v).all())

    bad = [k for k, v in sd.items() if isinstance(v, Tensor) and v.is_floating_point() and broken(k, v)]
    if bad:
        logger.warning(
            "%s: %d tensor(s) hold NaN or inf values (%s%s); results from these weights will be "
            "NaN", source, len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "",
        )  # fmt: skip
    return bad


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def extract_transformer_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The transformer state dict inside any of the accepted layouts (module docstring)."""
    candidates: list[tuple[str, Any]] = [("<top level>", obj)]
    if isinstance(obj, Mapping):
        for prefix, holder in (("", obj), ("trainer.", obj.get("trainer"))):
            if isinstance(holder, Mapping):
                candidates += [(prefix + k, holder[k]) for k in ("mvar_wo_ddp", "var_wo_ddp")
                               if k in holder]  # fmt: skip
    for where, cand in reversed(candidates):
        if _is_state_dict(cand) and looks_like_vqvae(cand):
            raise CheckpointError(
                f"{source} looks like a VQ-VAE checkpoint (its keys are encoder./decoder./"
                "quantize.), not a transformer; pass it as --vae-ckpt and the VAR/MVAR weights "
                "as --ckpt"
            )
        if _is_state_dict(cand):
            sd = dict(cand)
            if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
                sd = {k[len("module."):]: v for k, v in sd.items()}
            logger.debug("%s: state dict found at %s (%d tensors)", source, where, len(sd))
            return sd
    top = sorted(obj.keys())[:20] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{source} holds no transformer state dict: expected a plain state dict, "
        f"{{'mvar_wo_ddp': …}}, {{'var_wo_ddp': …}} or {{'trainer': {{'mvar_wo_ddp'|'var_wo_ddp': …}}}}; "
        f"found top-level {top}"
    )


def load_transformer_state_dict(
    model: nn.Module, sd: Mapping[str, Tensor], source: str = "<state dict>"
) -> None:
    """Strict load with a complete report. The model rebuilds its attention mask afterwards
    (any loaded ``attn_bias_for_masking`` values are ignored, docs/mvar.md §3)."""
    problems = state_dict_mismatch(model, sd)
    if problems:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise CheckpointError(
            f"transformer weights from {source} do not fit model {name!r}:\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(sd, strict=True)
    warn_non_finite(sd, source)
    logger.info("loaded transformer weights from %s", source)


def load_transformer(
    path: str | os.PathLike[str],
    cfg: ModelConfig | str,
    device: torch.device | str = "cpu",
    na_backend: str | None = None,
) -> nn.Module:
    """Build ``cfg`` and load the file at ``path`` into it (any accepted layout)."""
    p = resolve_checkpoint(path)
    sd = extract_transformer_state_dict(read_checkpoint(p), str(p))
    model = build_model(cfg, device="cpu", init=False, na_backend=na_backend)
    load_transformer_state_dict(model, sd, str(p))
    return model.to(device).eval()


def load_vqvae(
    path: str | os.PathLike[str],
    cfg: ModelConfig | VQVAEConfig | str,
    device: torch.device | str = "cpu",
) -> VQVAE:
    """The VQ-VAE of ``cfg``'s geometry (a model preset or config, or the tokenizer's own
    config, e.g. ``mvar.config.TINY_VAE``) with the weights of ``path`` (plain state dict)."""
    vcfg = cfg if isinstance(cfg, VQVAEConfig) else (get_preset(cfg) if isinstance(cfg, str) else cfg).vae
    p = resolve_checkpoint(path)
    obj = read_checkpoint(p)
    if not _is_state_dict(obj):
        raise CheckpointError(f"{p} is not a VQ-VAE state dict (expected a flat name -> tensor map)")
    if not looks_like_vqvae(obj):
        raise CheckpointError(
            f"{p} is not a VQ-VAE checkpoint (no encoder./decoder./quantize. keys; a transformer "
            "checkpoint?); pass the VQ-VAE as --vae-ckpt"
        )
    vae = build_vqvae(vcfg, device="cpu")
    load_vqvae_state_dict(vae, obj, str(p))
    warn_non_finite(obj, str(p))
    return vae.to(device).eval()


def load_pretrained(
    preset: str,
    ckpt: str | os.PathLike[str] | None = None,
    vae_ckpt: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    na_backend: str | None = None,
) -> tuple[VQVAE, nn.Module]:
    """(vae, transformer) for a model preset (``mvar-d16``) or a released checkpoint name
    (``mvar-finetune-d20``). ``None`` paths give random initialisation (seeded) — meant for
    trying the tiny presets out, never for numbers that claim to be the paper's.
    """
    cfg = get_preset(CHECKPOINT_PRESETS.get(preset, preset))
    torch.manual_seed(seed)
    if vae_ckpt is None:
        logger.warning("no VQ-VAE checkpoint given: random-init VQ-VAE for %s", cfg.name)
        vae = build_vqvae(cfg.vae, device=device).eval()
    else:
        vae = load_vqvae(vae_ckpt, cfg, device)
    if ckpt is None:
        logger.warning("no transformer checkpoint given: random-init %s", cfg.name)
        model = build_model(cfg, device=device, na_backend=na_backend).eval()
    else:
        model = load_transformer(ckpt, cfg, device, na_backend=na_backend)
    return vae, model
