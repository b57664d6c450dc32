"""Pictures: sample grids and per-scale progression strips (the image decoded after each
scale, like the paper's progression figure).

    mvar sample --model mvar-tiny --classes 1,2,3,4 --out outputs/samples
    mvar sample --model mvar-finetune-d16 --ckpt mvar-finetune-d16.pth \\
        --vae-ckpt vae_ch160v4096z32.pth --classes 207,360,388,974 --more-smooth
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mvar.checkpoint import load_pretrained
from mvar.config import sampling_for
from mvar.io import atomic_write
from mvar.precision import DEFAULT_PRECISION, PRECISIONS, check_precision

logger = logging.getLogger(__name__)


def to_uint8_grid(img01_B3HW: Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """A (rows·H, nrow·W, 3) uint8 image of the batch, with white gutters."""
    B, _, H, W = img01_B3HW.shape
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, np.uint8)
    imgs = (img01_B3HW.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, im in enumerate(imgs):
        r, c = divmod(i, nrow)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = im
    return grid


@torch.no_grad()
def progression(vae: torch.nn.Module, idx_Bl: Sequence[Tensor]) -> Tensor:
    """(S, B, 3, H, W) in [0, 1]: the image decoded from f̂ after each scale's tokens."""
    fhat = None
    frames = []
    for si, (idx, pn) in enumerate(zip(idx_Bl, vae.cfg.patch_nums, strict=True)):
        h = vae.embed(idx, pn)
        if fhat is None:
            N = vae.cfg.patch_nums[-1]
            fhat = h.new_zeros(h.shape[0], h.shape[1], N, N)
        fhat, _ = vae.next_ar_input(si, fhat, h)
        frames.append(vae.fhat_to_img(fhat).add(1).mul(0.5))
    return torch.stack(frames)


def save_png(array_HW3: np.ndarray, path: Path) -> Path:
    return atomic_write(path, lambda tmp: Image.fromarray(array_HW3).save(tmp, format="PNG"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mvar sample", description="Sample an image grid and per-scale progression strips.",
    )
    p.add_argument("--model", default="mvar-tiny",
                   help="model preset or released checkpoint name (e.g. mvar-finetune-d16)")
    p.add_argument("--ckpt", default=None, help="transformer checkpoint; omit for random init")
    p.add_argument("--vae-ckpt", default=None, help="VQ-VAE checkpoint (vae_ch160v4096z32.pth)")
    p.add_argument("--classes", default="1,2,3,4,5,6,7,8", help="comma-separated class ids")
    p.add_argument("--per-class", type=int, default=1)
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's official)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--more-smooth", action="store_true", help="Gumbel smoothing (pictures only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="fp32: no autocast; bf16: autocast (CPU, GPU); fp16: autocast, GPU only")
    p.add_argument("--out", default="outputs/samples")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    sampling = sampling_for(args.model, args.guidance, args.top_k, args.top_p, args.more_smooth)
    guidance, top_k, top_p = sampling.guidance, sampling.top_k, sampling.top_p
    dtype = check_precision(args.dtype, args.device)  # before any model is built
    vae, model = load_pretrained(args.model, args.ckpt, args.vae_ckpt, device=args.device,
                                 seed=args.seed)  # fmt: skip
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    label = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)
    out = model.sample(vae, label, guidance=guidance, top_k=top_k, top_p=top_p, g_seed=args.seed,
                       more_smooth=args.more_smooth, dtype=dtype)  # fmt: skip
    assert out.img01 is not None
    outdir = Path(args.out)
    tag = f"{args.model}_guidance{guidance:g}_k{top_k}_p{top_p:g}_seed{args.seed}_{dtype}"
    paths = [save_png(to_uint8_grid(out.img01, nrow=min(len(label), 8)), outdir / f"{tag}_grid.png")]
    frames = progression(vae, out.idx_Bl)  # (S, B, 3, H, W)
    S, B = frames.shape[:2]
    strips = frames.transpose(0, 1).reshape(S * B, *frames.shape[2:])  # row b: scales of image b
    paths.append(save_png(to_uint8_grid(strips, nrow=S), outdir / f"{tag}_progression.png"))
    for p in paths:
        logger.info("wrote %s", p)
    return paths


if __name__ == "__main__":
    main()
