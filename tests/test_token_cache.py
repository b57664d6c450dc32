"""The on-disk token cache (``mvar.data``): sharded over ranks, both flips cached, resumable,
keyed by its inputs; tested on a tiny folder of generated PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mvar.build import build_vqvae
from mvar.config import TINY_VAE
from mvar.data import (
    TokenCache,
    encode_dataset,
    encode_shard,
    imagenet_folder,
    load_token_cache,
    token_cache_key,
)

SIZE = TINY_VAE.image_size  # 256 px


def _write_folder(root: Path, n_per_class: int = 2, hw: tuple[int, int] = (300, 280)) -> Path:
    """Two classes of random-pixel PNGs (an ImageNet-layout folder), ``hw`` pixels each."""
    g = torch.Generator().manual_seed(0)
    for c in ("n01", "n02"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = (torch.rand(*hw, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vqvae(TINY_VAE).eval()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return _write_folder(tmp_path / "images")


def _kw() -> dict[str, object]:
    return {"recipe": "mvar", "image_size": SIZE, "flips": True, "chunk": 1, "batch_size": 2}


@pytest.mark.slow  # encodes 256 px images (~20 s on two cores)
def test_sharded_cache_equals_direct_encoding_with_both_flips(vae: torch.nn.Module,
                                                              folder: Path, tmp_path: Path) -> None:  # fmt: skip
    data = imagenet_folder(folder, SIZE, "mvar", random_flip=False)
    # Two "ranks" each encode their parts (0, 2 and 1, 3); the whole cache is then loaded.
    for rank in (0, 1):
        out = encode_shard(vae, data, tmp_path / "cache", rank=rank, world=2, **_kw())
    parts = sorted(p.name for p in out.glob("part-*.pt"))
    assert parts == [f"part-{c:06d}.pt" for c in range(4)]
    key = token_cache_key(vae, data, recipe="mvar", image_size=SIZE, flips=True, seed=0, chunk=1)
    cache = load_token_cache(out, key)
    direct = encode_dataset(vae, data, batch_size=4, flips=True)
    assert cache.labels.tolist() == [0, 0, 1, 1]
    for a, b, fa, fb in zip(cache.idx_Bl, direct.idx_Bl, cache.flip_idx_Bl, direct.flip_idx_Bl):
        assert torch.equal(a, b) and torch.equal(fa, fb)
    # The flipped view is the VQ-VAE's tokens of the mirrored image, and batch() picks per row.
    img = torch.stack([data[i][0] for i in range(4)])
    with torch.no_grad():
        mirrored = vae.img_to_idx(img.flip(-1))
    assert all(torch.equal(f, m) for f, m in zip(cache.flip_idx_Bl, mirrored))
    idx, _ = cache.batch(torch.tensor([0, 1]), torch.tensor([True, False]))
    assert torch.equal(idx[-1][0], cache.flip_idx_Bl[-1][0])
    assert torch.equal(idx[-1][1], cache.idx_Bl[-1][1])


@pytest.mark.slow
def test_cache_resumes_and_is_keyed_by_its_inputs(vae: torch.nn.Module, folder: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    data = imagenet_folder(folder, SIZE, "mvar", random_flip=False)
    out = encode_shard(vae, data, tmp_path / "cache", **_kw())
    (out / "part-000002.pt").unlink()  # as if killed before that part was written
    with pytest.raises(FileNotFoundError, match="incomplete: part-000002.pt is missing"):
        load_token_cache(out)
    calls = []
    real = vae.img_to_idx
    monkeypatch.setattr(vae, "img_to_idx", lambda x: calls.append(len(x)) or real(x))
    assert encode_shard(vae, data, tmp_path / "cache", **_kw()) == out
    assert calls == [1, 1]  # only the missing image, plain and flipped
    assert len(load_token_cache(out)) == 4
    monkeypatch.undo()

    # Another recipe, other VQ-VAE weights or another listing: another cache folder.
    other_recipe = encode_shard(vae, imagenet_folder(folder, SIZE, "var"), tmp_path / "cache",
                                **{**_kw(), "recipe": "var", "flips": False})  # fmt: skip
    assert other_recipe != out
    vae2 = build_vqvae(TINY_VAE).eval()
    key2 = token_cache_key(vae2, data, recipe="mvar", image_size=SIZE, flips=True, seed=0, chunk=1)
    with pytest.raises(ValueError, match="differs in: vqvae_sha256"):
        load_token_cache(out, key2)
    Image.new("RGB", (300, 300)).save(folder / "n02" / "img9.png")
    data3 = imagenet_folder(folder, SIZE, "mvar", random_flip=False)
    key3 = token_cache_key(vae, data3, recipe="mvar", image_size=SIZE, flips=True, seed=0, chunk=1)
    with pytest.raises(ValueError, match="data_sha256"):
        load_token_cache(out, key3)


def test_token_cache_without_flips_ignores_flip_requests() -> None:
    cache = TokenCache([torch.arange(6).view(3, 2)], torch.tensor([0, 1, 2]))
    idx, y = cache.batch(torch.tensor([2, 0]), torch.tensor([True, True]))
    assert idx[0].tolist() == [[4, 5], [0, 1]] and y.tolist() == [2, 0]


@pytest.mark.slow
def test_trainer_on_an_image_folder_uses_the_flip_cache(folder: Path, tmp_path: Path) -> None:
    from mvar.train import TrainConfig, train

    cfg = TrainConfig(model="mvar-tiny", out_dir=str(tmp_path / "run"), data=str(folder),
                      recipe="mvar", steps=2, batch_size=2, lr=1e-3)  # fmt: skip
    path = train(cfg)
    (cache,) = (tmp_path / "run" / "token_cache").glob("tokens-*")
    assert len(list(cache.glob("part-*.pt"))) == 1
    state = torch.load(path, weights_only=True)
    assert state["trainer"]["step"] == 2 and len(state["tokens_sha256"]) == 64
