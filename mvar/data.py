"""Training data: ImageNet folders with the official recipes, and a synthetic class-conditional
data set the project generates itself, so the embedded (CPU) runs need no download.

Images are (3, H, W) float32 in [-1, 1], the VQ-VAE's input range (docs/var.md §1).

Training sees them in one of two ways (``mvar train --tokenize``): :func:`online_loader` gives
each step's images through the recipe's random transform, freshly drawn (the official VAR
trainer's way, docs/var.md §4.4); the token cache (:func:`build_token_cache`) encodes them
once, both flips, as the official MVAR trainer's latent cache (docs/mvar.md §3.3). The batch of
a step is :func:`draw_batch` either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
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


def imagenet_folder(
    root: str | Path, image_size: int = 256, recipe: str = "var", *, random_flip: bool = True
) -> Dataset:
    """An ImageNet-layout folder (``root/<wnid>/*.JPEG``) with an official training recipe:

    * ``var``: shorter side to 1.125·size (Lanczos), random crop, no flip (docs/var.md §4);
    * ``mvar``: ADM centre crop (box-halve while the short side >= 2·size, bicubic to size,
      centre crop) and 50% horizontal flips (docs/mvar.md §3). ``random_flip=False`` leaves the
      flip out: the token cache encodes both orientations and draws the flip per batch.
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
        flip = [transforms.RandomHorizontalFlip()] if random_flip else []
        tf = transforms.Compose([transforms.Lambda(adm_center_crop), *flip, *to_pm1])
    else:
        raise ValueError(f"unknown recipe {recipe!r}; expected 'var' or 'mvar'")
    return datasets.ImageFolder(str(root), transform=tf)


@dataclass
class TokenCache:
    """Per-scale VQ tokens and labels of a whole data set (the official "latent cache").

    ``flip_idx_Bl`` (optional) holds the tokens of every image flipped horizontally, so the
    50% flip augmentation stays alive after tokenising: :meth:`batch` takes, per row, the
    flipped or the plain tokens. With ``crops`` = K > 1 the cache holds K random crops of
    every image, crop-major (row k·N + i is crop k of image i), and :meth:`batch` takes one.
    """

    idx_Bl: list[Tensor]  # per scale (K·N, pn*pn) int64
    labels: Tensor  # (N,) int64
    flip_idx_Bl: list[Tensor] | None = None  # per scale (K·N, pn*pn): the flipped images
    crops: int = 1  # K

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_flips(self) -> bool:
        return self.flip_idx_Bl is not None

    def batch(self, rows: Tensor, flip_B: Tensor | None = None,
              crop_B: Tensor | None = None) -> tuple[list[Tensor], Tensor]:  # fmt: skip
        """Tokens and labels of ``rows``; ``flip_B`` (bool per row) picks the flipped view,
        ``crop_B`` (0..K-1 per row) the crop."""
        at = rows if crop_B is None or self.crops == 1 else rows + crop_B * len(self)
        if flip_B is None or self.flip_idx_Bl is None:
            return [t[at] for t in self.idx_Bl], self.labels[rows]
        pick = flip_B.view(-1, 1)
        return (
            [torch.where(pick, f[at], t[at]) for t, f in zip(self.idx_Bl, self.flip_idx_Bl)],
            self.labels[rows],
        )


def _img_batches(data: Dataset, indices: Sequence[int], batch_size: int,
                 seed: int) -> Iterator[tuple[Tensor, list[int]]]:  # fmt: skip
    for s in range(0, len(indices), batch_size):
        imgs, labels = [], []
        for i in indices[s : s + batch_size]:
            # A random transform (VAR's random crop) draws from a per-image seed: the cache
            # is the same whatever the sharding or a resume.
            torch.manual_seed(seed * 1_000_003 + i)
            x, y = data[i]
            imgs.append(x)
            labels.append(int(y))
        yield torch.stack(imgs), labels


@torch.no_grad()
def _encode(vae: torch.nn.Module, img: Tensor, flips: bool) -> tuple[list[Tensor], list[Tensor] | None]:
    device = next(vae.parameters()).device
    img = img.to(device)
    idx = [t.cpu() for t in vae.img_to_idx(img)]
    flipped = [t.cpu() for t in vae.img_to_idx(img.flip(-1))] if flips else None
    return idx, flipped


@torch.no_grad()
def encode_dataset(vae: torch.nn.Module, data: Dataset, batch_size: int = 32, *,
                   flips: bool = False, seed: int = 0) -> TokenCache:  # fmt: skip
    """Tokenise ``data`` once with the frozen VQ-VAE, in memory (small data sets; for ImageNet
    use :func:`build_token_cache`). ``flips`` also encodes every image flipped."""
    n = len(data)  # type: ignore[arg-type]
    per_scale: list[list[Tensor]] = []
    per_scale_f: list[list[Tensor]] = []
    labels: list[int] = []
    batches = _img_batches(data, range(n), batch_size, seed)
    for img, y in tqdm(batches, total=-(-n // batch_size), desc="tokenising", unit="batch", leave=False):
        idx, flipped = _encode(vae, img, flips)
        labels += y
        per_scale = per_scale or [[] for _ in idx]
        per_scale_f = per_scale_f or [[] for _ in idx]
        for si, t in enumerate(idx):
            per_scale[si].append(t)
            if flipped is not None:
                per_scale_f[si].append(flipped[si])
    return TokenCache(
        [torch.cat(t) for t in per_scale],
        torch.tensor(labels, dtype=torch.long),
        [torch.cat(t) for t in per_scale_f] if flips else None,
    )


# ---------------------------------------------------------------------------------------------
# The batch of a training step, and online tokenising (fresh augmentation every step).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchDraw:
    """What step g trains on, over the whole (global) batch: a pure function of (seed, g), the
    same on every rank; rank r takes rows ``r::world``."""

    rows_B: Tensor  # (B,) int64 image indices, drawn with replacement
    flip_B: Tensor  # (B,) bool: take the flipped view (token caches that hold both flips)
    aug_seed_B: Tensor  # (B,) int64 in [0, 2**32): seed of each row's random transform


def draw_batch(num_images: int, batch_size: int, seed: int, step: int) -> BatchDraw:
    """The rows of step ``step``, their flips and their augmentation seeds.

    The draws come in this order from one generator seeded by (seed, step), so the rows are
    the same whether or not the later draws are used (cached and online runs of one seed see
    the same images)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows_B = torch.randint(num_images, (batch_size,), generator=g)
    flip_B = torch.rand(batch_size, generator=g) < 0.5
    aug_seed_B = torch.randint(2**32, (batch_size,), generator=g)  # torch keeps 32 bits of a seed
    return BatchDraw(rows_B, flip_B, aug_seed_B)


class AugmentedImages(Dataset):
    """Item ``(i, aug_seed)``: image i of ``data`` through its random transform (crop, flip),
    drawn from a generator seeded by ``aug_seed`` alone. The result does not depend on the
    process, the worker or what was loaded before, so any number of DataLoader workers gives
    the same batches and a resumed run repeats the uninterrupted one."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        i, aug_seed = key
        # torchvision's random transforms draw from torch's global generator: fork it so the
        # caller's random state (label dropout, drop-path) is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(aug_seed))
            x, y = self.data[int(i)]
        return x, int(y)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share (rows ``rank::world``) of the batches of steps ``start .. end-1``, as
    (image index, augmentation seed) pairs from :func:`draw_batch`."""

    def __init__(self, num_images: int, batch_size: int, seed: int, start: int, end: int,
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.start, self.end, self.rank, self.world = start, end, rank, world

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            d = draw_batch(self.num_images, self.batch_size, self.seed, step)
            rows = d.rows_B[self.rank :: self.world].tolist()
            seeds = d.aug_seed_B[self.rank :: self.world].tolist()
            yield list(zip(rows, seeds))


def online_loader(data: Dataset, *, batch_size: int, seed: int, start: int, end: int,
                  rank: int = 0, world: int = 1, workers: int = 0,
                  pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """Images and labels of this rank's rows of steps ``start .. end-1``, one batch per step,
    each image through a fresh draw of its random transform (the official VAR trainer's data
    path: it decodes and augments every step, then encodes with the frozen VQ-VAE).
    ``workers`` decode in parallel; the batches are the same for any number of them."""
    n = len(data)  # type: ignore[arg-type]
    return DataLoader(
        AugmentedImages(data),
        batch_sampler=StepBatchSampler(n, batch_size, seed, start, end, rank, world),
        num_workers=workers,
        pin_memory=pin_memory,
        # The loader draws a base seed for its workers; a private generator keeps it from
        # consuming the global one (our transforms are seeded per item and do not use it).
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def online_key(vae: torch.nn.Module, data: Dataset, *, recipe: str, image_size: int,
               seed: int) -> dict[str, object]:  # fmt: skip
    """Everything the tokens of an online run depend on (what the checkpoint records and a
    resume checks): the VQ-VAE's weights, the data listing, the recipe and the code."""
    return {"tokenize": "online", **_token_inputs(vae, data, recipe, image_size, seed)}


def _token_inputs(vae: torch.nn.Module, data: Dataset, recipe: str, image_size: int,
                  seed: int) -> dict[str, object]:  # fmt: skip
    """What every token depends on, cached or online: weights, data, recipe, seed, code."""
    return {
        "format": TOKEN_CACHE_FORMAT,
        "vqvae_sha256": vqvae_sha256(vae),
        "data_sha256": dataset_fingerprint(data),
        "num_images": len(data),  # type: ignore[arg-type]
        "recipe": recipe,
        "image_size": image_size,
        "seed": seed,
        "code_sha256": _code_version(),
    }


# ---------------------------------------------------------------------------------------------
# The on-disk token cache for paper-scale data: sharded over ranks, resumable, content-keyed.
# ---------------------------------------------------------------------------------------------

#: Bump when the cache's file layout or what a token means changes.
TOKEN_CACHE_FORMAT = 1


def _sha256_tensors(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vqvae_sha256(vae: torch.nn.Module) -> str:
    """sha256 of the VQ-VAE's weights (its content, whatever file it came from)."""
    return _sha256_tensors(dict(vae.state_dict()))


def dataset_fingerprint(data: Dataset) -> str:
    """sha256 of a data set's listing: for an image folder every (relative path, size, class),
    for a dataclass data set (the generated ones) its fields. Other data sets must say what
    they are with a ``fingerprint()`` method."""
    h = hashlib.sha256()
    if hasattr(data, "fingerprint"):
        h.update(str(data.fingerprint()).encode())
    elif hasattr(data, "samples") and hasattr(data, "root"):
        root = Path(data.root)
        for path, cls in data.samples:
            p = Path(path)
            h.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\t{cls}\n".encode())
    elif dataclasses.is_dataclass(data):
        h.update(repr(data).encode())
    else:
        raise ValueError(
            f"cannot fingerprint a {type(data).__name__}: give it a fingerprint() method "
            f"(a string that changes whenever its images do)"
        )
    return h.hexdigest()


def _code_version() -> str:
    """sha256 of the code that decides what a token is: the VQ-VAE and the preprocessing."""
    from mvar import vqvae

    h = hashlib.sha256(str(TOKEN_CACHE_FORMAT).encode())
    for src in (inspect.getsource(vqvae), inspect.getsource(imagenet_folder),
                inspect.getsource(_img_batches), inspect.getsource(_encode)):  # fmt: skip
        h.update(src.encode())
    return h.hexdigest()


def _crop_seed(seed: int, crop: int) -> int:
    """The seed whose per-image draws give crop ``crop`` (crop 0: the run's seed itself, so a
    one-crop cache is the first crop of a K-crop one). torch's CPU generator keeps only the low
    32 bits of a seed; an odd step keeps the K seeds of one image distinct modulo 2**32."""
    return seed + crop * 1_000_000_007


def token_cache_key(vae: torch.nn.Module, data: Dataset, *, recipe: str, image_size: int,
                    flips: bool, seed: int, chunk: int, crops: int = 1) -> dict[str, object]:  # fmt: skip
    """Everything a cached token depends on; the cache folder is named by its sha256."""
    # "crops" only when > 1: one-crop caches written before the option keep their key.
    return ({"crops": crops} if crops > 1 else {}) | _token_inputs(
        vae, data, recipe, image_size, seed
    ) | {"flips": flips, "chunk": chunk}


def _key_dir(root: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return root / f"tokens-{digest[:20]}"


def _part_path(folder: Path, c: int) -> Path:
    return folder / f"part-{c:06d}.pt"


@torch.no_grad()
def encode_shard(vae: torch.nn.Module, data: Dataset, cache_root: str | Path, *, recipe: str,
                 image_size: int, rank: int = 0, world: int = 1, flips: bool = True,
                 seed: int = 0, chunk: int = 1024, batch_size: int = 32,
                 crops: int = 1) -> Path:  # fmt: skip
    """Encode this rank's share of ``data`` into the cache folder of its key: parts of
    ``chunk`` images, part c on rank c mod world, each written atomically. A part already on
    disk is skipped, so a killed job resumes where it stopped. Returns the folder.

    ``crops`` = K > 1 encodes K draws of the random transform per image (VAR's random crop),
    stored per part and scale as (K, n, pn*pn)."""
    from mvar.io import atomic_torch_save, atomic_write_json

    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    key = token_cache_key(vae, data, recipe=recipe, image_size=image_size, flips=flips,
                          seed=seed, chunk=chunk, crops=crops)  # fmt: skip
    folder = _key_dir(Path(cache_root), key)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    if rank == 0 and not manifest.is_file():
        atomic_write_json(manifest, key)
    n = len(data)  # type: ignore[arg-type]
    mine = [c for c in range(-(-n // chunk)) if c % world == rank]
    todo = [c for c in mine if not _part_path(folder, c).is_file()]
    logger.info("token cache %s: rank %d/%d encodes %d of its %d parts (%d images each)",
                folder, rank, world, len(todo), len(mine), chunk)  # fmt: skip
    for done, c in enumerate(todo, 1):
        indices = range(c * chunk, min(n, (c + 1) * chunk))
        per_crop: list[list[Tensor]] = []  # per crop, per scale (n, pn*pn)
        per_crop_f: list[list[Tensor]] = []
        for k in range(crops):
            idx_parts: list[list[Tensor]] = []
            flip_parts: list[list[Tensor]] = []
            labels: list[int] = []
            for img, y in _img_batches(data, indices, batch_size, _crop_seed(seed, k)):
                idx, flipped = _encode(vae, img, flips)
                labels += y
                idx_parts.append(idx)
                if flipped is not None:
                    flip_parts.append(flipped)
            per_crop.append([torch.cat(ts) for ts in zip(*idx_parts)])
            per_crop_f.append([torch.cat(ts) for ts in zip(*flip_parts)] if flips else [])

        def stack(views: list[list[Tensor]]) -> list[Tensor]:  # one crop: (n, pn*pn) as before
            return views[0] if crops == 1 else [torch.stack(ts) for ts in zip(*views)]

        part = {
            "idx": stack(per_crop),
            "flip_idx": stack(per_crop_f) if flips else None,
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        atomic_torch_save(part, _part_path(folder, c))
        logger.info("token cache: part %d written (%d/%d on rank %d)", c, done, len(todo), rank)
    return folder


def load_token_cache(folder: str | Path, key: dict[str, object] | None = None) -> TokenCache:
    """Assemble a complete cache folder (all parts, in image order); ``key`` must match its
    manifest when given."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder} is not a token cache (no manifest.json)")
    saved = json.loads(manifest.read_text())
    if key is not None and saved != key:
        diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        raise ValueError(f"token cache {folder} was built from other inputs (differs in: "
                         f"{', '.join(diff)}); expected a cache keyed by this run's inputs")  # fmt: skip
    n, chunk = int(saved["num_images"]), int(saved["chunk"])
    parts = []
    for c in range(-(-n // chunk)):
        p = _part_path(folder, c)
        if not p.is_file():
            raise FileNotFoundError(f"token cache {folder} is incomplete: {p.name} is missing "
                                    f"(rerun the encoding; finished parts are kept)")  # fmt: skip
        parts.append(torch.load(p, map_location="cpu", weights_only=True))
    flips = bool(saved["flips"])

    def join(views: list[list[Tensor]]) -> list[Tensor]:
        # Parts hold (n, pn*pn), or (K, n, pn*pn) for K crops: join images, then crop-major.
        return [torch.cat(ts, dim=-2).flatten(0, -2) for ts in zip(*views)]

    return TokenCache(
        join([p["idx"] for p in parts]),
        torch.cat([p["labels"] for p in parts]),
        join([p["flip_idx"] for p in parts]) if flips else None,
        crops=int(saved.get("crops", 1)),
    )


def build_token_cache(vae: torch.nn.Module, data: Dataset, cache_root: str | Path, *,
                      recipe: str, image_size: int, flips: bool = True, seed: int = 0,
                      chunk: int = 1024, batch_size: int = 32, crops: int = 1) -> TokenCache:  # fmt: skip
    """Paper-scale tokenising: every rank encodes its parts (:func:`encode_shard`), then all
    wait for each other and load the whole cache. Resumable and keyed by its inputs."""
    from mvar import dist

    rank, world = dist.get_rank(), dist.get_world_size()
    folder = encode_shard(vae, data, cache_root, recipe=recipe, image_size=image_size,
                          rank=rank, world=world, flips=flips, seed=seed, chunk=chunk,
                          batch_size=batch_size, crops=crops)  # fmt: skip
    dist.barrier()
    key = token_cache_key(vae, data, recipe=recipe, image_size=image_size, flips=flips,
                          seed=seed, chunk=chunk, crops=crops)  # fmt: skip
    return load_token_cache(folder, key)
