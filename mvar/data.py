"""Training data: ImageNet folders with the official recipes, and a synthetic class-conditional
data set the project generates itself, so the embedded (CPU) runs need no download.

Images are (3, H, W) float32 in [-1, 1], the VQ-VAE's input range (docs/var.md §1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SHAPES = ("disc", "square", "triangle", "ring", "cross")
PALETTE = (  # RGB in [0, 1]: class colours far apart so that classes are easy to tell apart
    (0.90, 0.20, 0.20), (0.20, 0.70, 0.30), (0.25, 0.35, 0.90), (0.95, 0.80, 0.15),
    (0.70, 0.25, 0.80), (0.10, 0.80, 0.85), (0.95, 0.55, 0.10), (0.95, 0.95, 0.95),
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticShapes(Dataset):
    """Class c draws shape ``SHAPES[c % 5]`` in colour ``PALETTE[(c // 5) % 8]`` at a random
    position, size and rotation over a random two-colour gradient background.

    With ``texture=True`` the shape is filled with stripes of its colour and a darker shade of
    it, at a random orientation and phase, with a period of ``image_size / 5`` pixels: the
    class still fixes the global layout (which shape, which colour), while the stripes are
    local detail that a generator has to get right pixel by pixel (the embedded study,
    ``repro.embedded``, uses it so that both kinds of structure matter).

    Item i is a pure function of (seed, i): the data set is identical on every machine and in
    every process, so DDP ranks and resumed runs see the same images, and disjoint index
    ranges are disjoint splits (classes are interleaved, so a range whose start and length
    are multiples of ``num_classes`` is class-balanced).
    """

    num_classes: int = 10
    per_class: int = 64
    image_size: int = 256
    seed: int = 0
    texture: bool = False
    radius: tuple[float, float] = (0.25, 0.5)  # shape radius range, fraction of the half-width

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES) * len(PALETTE):
            raise ValueError(
                f"SyntheticShapes has {len(SHAPES) * len(PALETTE)} distinct classes, "
                f"asked for {self.num_classes}"
            )
        lo, hi = self.radius
        if not 0 < lo <= hi:
            raise ValueError(f"radius range must satisfy 0 < low <= high, got {self.radius}")

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def label(self, i: int) -> int:
        return i % self.num_classes  # classes interleaved, so any prefix is balanced

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        c = self.label(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        S = self.image_size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
        # Background: a gradient between two dim random colours along a random direction.
        c0, c1 = torch.rand(3, generator=g) * 0.4, torch.rand(3, generator=g) * 0.4
        ang = float(torch.rand((), generator=g)) * 2 * math.pi
        t = ((math.cos(ang) * xx + math.sin(ang) * yy) + 1.5) / 3
        img = c0.view(3, 1, 1) * (1 - t) + c1.view(3, 1, 1) * t
        # Foreground shape in shape coordinates (translated, rotated, scaled).
        cx, cy = (torch.rand(2, generator=g) * 1.0 - 0.5).tolist()
        lo, hi = self.radius
        r = lo + (hi - lo) * float(torch.rand((), generator=g))
        rot = float(torch.rand((), generator=g)) * 2 * math.pi
        u = (math.cos(rot) * (xx - cx) + math.sin(rot) * (yy - cy)) / r
        v = (-math.sin(rot) * (xx - cx) + math.cos(rot) * (yy - cy)) / r
        shape = SHAPES[c % len(SHAPES)]
        if shape == "disc":
            mask = u**2 + v**2 <= 1
        elif shape == "square":
            mask = (u.abs() <= 0.8) & (v.abs() <= 0.8)
        elif shape == "triangle":
            mask = (v <= 0.7) & (v >= -0.9 + 1.6 * u.abs() * 1.1)
        elif shape == "ring":
            rr = u**2 + v**2
            mask = (rr <= 1) & (rr >= 0.45)
        else:  # cross
            mask = ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))
        colour = torch.tensor(PALETTE[(c // len(SHAPES)) % len(PALETTE)]).view(3, 1, 1)
        fill = colour.expand(3, S, S)
        if self.texture:
            # Stripes in image coordinates: period image_size/5 px (0.4 in [-1, 1] units).
            s_ang = float(torch.rand((), generator=g)) * math.pi
            phase = float(torch.rand((), generator=g))
            w = (math.cos(s_ang) * xx + math.sin(s_ang) * yy) / 0.4 + phase
            dark = (torch.frac(w) < 0.5).unsqueeze(0)
            fill = torch.where(dark, colour * 0.55, colour)
        img = torch.where(mask, fill, img)
        return img.mul(2).sub(1).clamp(-1, 1), c


def imagenet_folder(root: str | Path, image_size: int = 256, recipe: str = "var") -> Dataset:
    """An ImageNet-layout folder (``root/<wnid>/*.JPEG``) with an official training recipe:

    * ``var``: shorter side to 1.125·size (Lanczos), random crop, no flip (docs/var.md §4);
    * ``mvar``: ADM centre crop (box-halve while the short side >= 2·size, bicubic to size,
      centre crop) and 50% horizontal flips (docs/mvar.md §3).
    """
    from PIL import Image
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected an ImageNet-style tree "
            f"root/<class>/<image> (download ImageNet from https://image-net.org)"
        )

    def adm_center_crop(img: Image.Image) -> Image.Image:
        while min(img.size) >= 2 * image_size:
            img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
        s = image_size / min(img.size)
        img = img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC)
        w, h = img.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        return img.crop((left, top, left + image_size, top + image_size))

    to_pm1 = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    if recipe == "var":
        tf = transforms.Compose(
            [
                transforms.Resize(round(1.125 * image_size), interpolation=transforms.InterpolationMode.LANCZOS),
                transforms.RandomCrop(image_size),
                *to_pm1,
            ]
        )
    elif recipe == "mvar":
        tf = transforms.Compose([transforms.Lambda(adm_center_crop), transforms.RandomHorizontalFlip(), *to_pm1])
    else:
        raise ValueError(f"unknown recipe {recipe!r}; expected 'var' or 'mvar'")
    return datasets.ImageFolder(str(root), transform=tf)


@dataclass
class TokenCache:
    """Per-scale VQ tokens and labels of a whole data set (the official "latent cache")."""

    idx_Bl: list[Tensor]  # per scale (N, pn*pn) int64
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, rows: Tensor) -> tuple[list[Tensor], Tensor]:
        return [t[rows] for t in self.idx_Bl], self.labels[rows]


@torch.no_grad()
def encode_dataset(vae: torch.nn.Module, data: Dataset, batch_size: int = 32) -> TokenCache:
    """Tokenise ``data`` once with the frozen VQ-VAE (tqdm progress)."""
    order = range(len(data))  # type: ignore[arg-type]
    device = next(vae.parameters()).device
    per_scale: list[list[Tensor]] = []
    labels: list[int] = []
    for s in tqdm(range(0, len(order), batch_size), desc="tokenising", unit="batch", leave=False):
        items = [data[i] for i in order[s : s + batch_size]]
        img = torch.stack([x for x, _ in items]).to(device)
        labels += [int(y) for _, y in items]
        idx = vae.img_to_idx(img)
        if not per_scale:
            per_scale = [[] for _ in idx]
        for store, t in zip(per_scale, idx):
            store.append(t.cpu())
    return TokenCache([torch.cat(t) for t in per_scale], torch.tensor(labels, dtype=torch.long))

