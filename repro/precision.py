"""How far bf16 / fp16 autocast moves the logits and the sampled tokens from fp32 (issue 13,
docs/precision.md): measured, per scale.

    python -m repro.precision                       # CPU: bf16 measured, fp16 "not measured"
    python -m repro.precision --device cuda         # GPU: bf16 and fp16

Two kinds of model:

- the parity fixtures (``$MVAR_PARITY_FIXTURES``, loaded as ``tests/test_parity.py`` does):
  the official code's own weights, config and teacher-forcing input;
- VAR-d16 and MVAR-d16 with random weights (B = 2), PyTorch's default initialisation. The
  official from-scratch init scales every block's residual branch by 1e-5 (init_adaln_gamma),
  which would make the blocks, where autocast acts, vanish from the logits and hide their
  rounding; the default init keeps them at full strength. Teacher input: the VQ-VAE's
  teacher-forcing input of random tokens.

Per (model, precision, scale): max and mean |logits(autocast) - logits(fp32)| of a teacher
forcing forward, the mean |logit| of fp32 for scale, and the fraction of tokens sampled equal
to fp32's with the same seed (``sample(..., dtype=)``, decode off). Token disagreement
cascades: after a differing token, later scales see different inputs, so the fraction is an
end-to-end figure, not a per-scale error rate.

Writes ``<out>/logits_tolerance.csv`` (long format, with device / torch / git SHA / threads)
and ``<out>/logits_tolerance.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from mvar import precision
from mvar.io import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("source", "model", "dtype", "scale", "pn", "logits_max_abs_err",
           "logits_mean_abs_err", "fp32_logits_mean_abs", "token_agreement", "status",
           "device", "torch", "threads", "git_sha")  # fmt: skip


def teacher_logits(model: nn.Module, label_B: torch.Tensor, x_BLCv: torch.Tensor,
                   dtype: str) -> torch.Tensor:  # fmt: skip
    """Teacher-forcing logits (B, L, V) with the model's blocks under ``dtype``'s autocast."""
    with torch.no_grad(), precision.autocast(dtype, label_B.device):
        return model(label_B, x_BLCv).float()


def sampled_tokens(model: nn.Module, vae: nn.Module, label_B: torch.Tensor, dtype: str,
                   seed: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """Per-scale tokens of one sampling call (VAR's FID setting top_k 900 clamps on small
    vocabularies; cfg 1.5), decode off."""
    with torch.no_grad():
        out = model.sample(vae, label_B, guidance=1.5, top_k=900, top_p=0.96, g_seed=seed,
                           decode=False, dtype=dtype)  # fmt: skip
    return out.idx_Bl


def measure(source: str, name: str, model: nn.Module, vae: nn.Module, label_B: torch.Tensor,
            x_BLCv: torch.Tensor, dtypes: Sequence[str]) -> Iterator[dict[str, object]]:  # fmt: skip
    device = label_B.device
    ref = teacher_logits(model, label_B, x_BLCv, "fp32")
    ref_tok = sampled_tokens(model, vae, label_B, "fp32")
    for dtype in dtypes:
        try:
            precision.check_precision(dtype, device)
        except ValueError:
            for si, pn in enumerate(model.patch_nums):
                yield {"source": source, "model": name, "dtype": dtype, "scale": si, "pn": pn,
                       "status": f"not measured: {dtype} needs a GPU (this run: {device.type})"}  # fmt: skip
            continue
        t0 = time.perf_counter()
        got = teacher_logits(model, label_B, x_BLCv, dtype)
        tok = sampled_tokens(model, vae, label_B, dtype)
        for si, pn in enumerate(model.patch_nums):
            bg, ed = model.begin_ends[si]
            d = (got[:, bg:ed] - ref[:, bg:ed]).abs()
            yield {
                "source": source, "model": name, "dtype": dtype, "scale": si, "pn": pn,
                "logits_max_abs_err": f"{d.max().item():.4g}",
                "logits_mean_abs_err": f"{d.mean().item():.4g}",
                "fp32_logits_mean_abs": f"{ref[:, bg:ed].abs().mean().item():.4g}",
                "token_agreement": f"{(tok[si] == ref_tok[si]).float().mean().item():.4f}",
                "status": "ok",
            }  # fmt: skip
        log.info("%s %s %s: %.1f s", source, name, dtype, time.perf_counter() - t0)


def fixture_cases(device: torch.device) -> Iterator[tuple[str, str, nn.Module, nn.Module,
                                                          torch.Tensor, torch.Tensor]]:  # fmt: skip
    from mvar.build import build_model, build_vqvae
    from mvar.checkpoint import load_transformer_state_dict
    from mvar.vqvae import load_vqvae_state_dict
    from tests.conftest import fixture_configs, load_parity_fixtures, parity_fixture_dir

    directory = parity_fixture_dir()
    fixtures = load_parity_fixtures(directory) if directory.is_dir() else []
    if not fixtures:
        log.warning("no parity fixtures in %s ($MVAR_PARITY_FIXTURES): skipped", directory)
    for fx in fixtures:
        vae_cfg, model_cfgs = fixture_configs(fx["config"])
        vae = build_vqvae(vae_cfg, device)
        load_vqvae_state_dict(vae, fx["vae_state_dict"], fx["_path"])
        for arch, cfg in model_cfgs.items():
            model = build_model(cfg, device, init=False)
            load_transformer_state_dict(model, fx["transformer_state_dict"], fx["_path"])
            yield (f"fixture:{Path(fx['_path']).name}", arch, model.eval(), vae.eval(),
                   fx["inputs"]["label"].to(device), fx["vae"]["teacher_input"].to(device))  # fmt: skip


def random_cases(presets: Sequence[str], batch: int, device: torch.device) -> Iterator[tuple[
        str, str, nn.Module, nn.Module, torch.Tensor, torch.Tensor]]:  # fmt: skip
    from mvar.build import build_model, build_vqvae
    from mvar.config import get_preset

    for preset in presets:
        cfg = get_preset(preset)
        torch.manual_seed(0)
        vae = build_vqvae(cfg.vae, device).eval()
        model = build_model(cfg, device, init=False).eval()  # PyTorch default init, see above
        gen = torch.Generator(device="cpu").manual_seed(1)
        label = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
        idx = [torch.randint(0, cfg.vocab_size, (batch, pn * pn), generator=gen).to(device)
               for pn in cfg.patch_nums]  # fmt: skip
        with torch.no_grad():
            x = vae.idx_to_teacher_input(idx)
        yield f"random-init:B{batch}", preset, model, vae, label, x


def write(rows: list[dict[str, object]], out: Path, env: dict[str, str]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "logits_tolerance.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS} | env)
    md = out / "logits_tolerance.md"
    lines = [
        "# Logits and tokens under autocast vs fp32",
        "",
        (f"Made by `python -m repro.precision` on {env['device']}, torch {env['torch']}, "
         f"{env['threads']} threads, git {env['git_sha']}. Teacher forcing; errors are "
         "|autocast - fp32| over every logit of the scale; token agreement is the fraction of "
         "tokens sampled equal to fp32's with the same seed (it cascades across scales)."),
        "",
        ("| source | model | dtype | scale (pn) | max abs err | mean abs err | "
         "fp32 mean abs logit | token agreement |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            if r["scale"] == 0:
                lines.append(f"| {r['source']} | {r['model']} | {r['dtype']} | all | "
                             f"{r['status']} | | | |")  # fmt: skip
            continue
        lines.append(f"| {r['source']} | {r['model']} | {r['dtype']} | {r['scale']} ({r['pn']}) | "
                     f"{r['logits_max_abs_err']} | {r['logits_mean_abs_err']} | "
                     f"{r['fp32_logits_mean_abs']} | {r['token_agreement']} |")  # fmt: skip
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return csv_path, md


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    p = argparse.ArgumentParser(prog="python -m repro.precision", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports/precision"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", default="var-d16,mvar-d16",
                   help="random-weight models (comma-separated; empty: none)")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from mvar.env import git_sha
    from repro.report import device_name

    device = torch.device(args.device)
    env = {"device": device_name(device), "torch": torch.__version__,
           "threads": str(torch.get_num_threads()), "git_sha": git_sha()}  # fmt: skip
    dtypes = [d for d in precision.PRECISIONS if d != "fp32"]
    presets = [s for s in args.presets.split(",") if s]
    rows: list[dict[str, object]] = []
    for case in [*fixture_cases(device), *random_cases(presets, args.batch, device)]:
        rows += list(measure(*case, dtypes))
    paths = write(rows, args.out, env)
    log.info("wrote %s and %s", *paths)
    return paths


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
