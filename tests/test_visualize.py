"""The picture command: grid and per-scale progression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvar.checkpoint import load_pretrained
from mvar.visualize import main, progression, to_uint8_grid


def test_progression_ends_at_the_sampled_image() -> None:
    vae, model = load_pretrained("var-tiny", seed=0)
    out = model.sample(vae, torch.tensor([1]), cfg=1.5, top_k=20, g_seed=0)
    frames = progression(vae, out.idx_Bl)
    assert frames.shape == (10, 1, 3, 32, 32)  # the tiny VAE's 32 px
    assert (frames[-1] - out.img01).abs().max() < 1e-5
    assert (frames[0] - frames[-1]).abs().max() > 1e-3  # earlier scales are coarser


def test_grid_layout() -> None:
    imgs = torch.zeros(5, 3, 4, 6)
    imgs[4] = 1.0
    grid = to_uint8_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    assert (grid[1 + 2 * 5 : 1 + 2 * 5 + 4, 1 : 1 + 6] == 255).all()  # image 4: row 2, column 0
    assert (grid[1:5, 1:7] == 0).all()


def test_sample_command_writes_pictures(tmp_path: Path) -> None:
    paths = main(["--model", "var-tiny", "--classes", "3", "--out", str(tmp_path)])
    grid, strip = (np.asarray(Image.open(p)) for p in paths)
    assert grid.shape == (2 + 34, 2 + 34, 3)  # 32 px images
    assert strip.shape == (2 + 34, 2 + 10 * 34, 3)
