"""Online tokenising (``mvar train --tokenize online``): every step loads its images through the
recipe's random transform and encodes them with the frozen VQ-VAE, as the official VAR trainer
does. Tested on a tiny folder of generated PNGs at the tiny presets' 32 px."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from mvar.checkpoint import load_transformer
from mvar.config import TINY_VAE
from mvar.data import AugmentedImages, draw_batch, imagenet_folder, online_loader
from mvar.train import TrainConfig, TrainError, main, tokenize_mode, train
from tests.test_token_cache import _write_folder as write_folder

SIZE = TINY_VAE.image_size  # 32 px; recipe var resizes the short side to 36 and crops 32


def _write_folder(root: Path, n_per_class: int = 2) -> Path:
    return write_folder(root, n_per_class, hw=(40, 44))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return _write_folder(tmp_path / "images")


def _crop_offset(img: torch.Tensor, full: torch.Tensor) -> tuple[int, int]:
    """The (top, left) at which ``img`` is a window of ``full``; fails if it is none."""
    H, W = full.shape[-2:]
    hits = [(t, l) for t in range(H - SIZE + 1) for l in range(W - SIZE + 1)
            if torch.equal(full[:, t : t + SIZE, l : l + SIZE], img)]  # fmt: skip
    assert len(hits) == 1, f"not a unique {SIZE}px window of the resized image: {hits}"
    return hits[0]


def test_each_step_draws_a_fresh_crop_of_the_same_image(folder: Path) -> None:
    data = imagenet_folder(folder, SIZE, "var")
    # The recipe's deterministic part: short side to 1.125·size with Lanczos, in [-1, 1].
    resize = transforms.Compose([
        transforms.Resize(round(1.125 * SIZE), interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip
    full = resize(Image.open(data.samples[0][0]).convert("RGB"))
    assert full.shape[-2:] == (36, 39)
    items = AugmentedImages(data)
    offsets = {_crop_offset(items[(0, s)][0], full) for s in range(8)}
    assert len(offsets) > 1, "every draw gave the same crop"
    assert torch.equal(items[(0, 5)][0], items[(0, 5)][0])  # the seed alone decides the crop
    # Through the loader: image 0 met at two different steps is cropped differently.
    seen: dict[int, list[tuple[int, int]]] = {}
    for step, (img, _) in enumerate(online_loader(data, batch_size=4, seed=0, start=0, end=12)):
        for row, x in zip(draw_batch(len(data), 4, 0, step).rows_B.tolist(), img):
            if row == 0:
                seen.setdefault(step, []).append(_crop_offset(x, full))
    assert len(seen) >= 2 and len({o for offs in seen.values() for o in offs}) > 1, seen


def test_loader_is_sharded_by_rank_and_independent_of_workers(folder: Path) -> None:
    data = imagenet_folder(folder, SIZE, "var")
    kw = {"batch_size": 4, "seed": 3, "start": 2, "end": 5}
    whole = list(online_loader(data, **kw))
    assert len(whole) == 3
    for (img, y), step in zip(whole, range(2, 5)):
        assert img.shape == (4, 3, SIZE, SIZE)
        assert y.tolist() == [data.targets[i] for i in draw_batch(len(data), 4, 3, step).rows_B.tolist()]
    forked = list(online_loader(data, workers=2, **kw))
    ranks = [list(online_loader(data, rank=r, world=2, **kw)) for r in range(2)]
    for (img, y), (img_w, y_w), r0, r1 in zip(whole, forked, *ranks):
        assert torch.equal(img, img_w) and torch.equal(y, y_w)
        assert torch.equal(img[0::2], r0[0]) and torch.equal(img[1::2], r1[0])
        assert torch.equal(y[0::2], r0[1]) and torch.equal(y[1::2], r1[1])


def test_auto_is_online_for_the_var_recipe_on_a_folder() -> None:
    assert tokenize_mode(TrainConfig(data="/imagenet", recipe="var")) == "online"
    assert tokenize_mode(TrainConfig(data="/imagenet", recipe="mvar")) == "cached"
    assert tokenize_mode(TrainConfig(data="synthetic")) == "cached"
    assert tokenize_mode(TrainConfig(data="synthetic", recipe="var"), data_given=True) == "cached"
    assert tokenize_mode(TrainConfig(data="/imagenet", recipe="mvar", tokenize="online")) == "online"
    assert tokenize_mode(TrainConfig(data="/imagenet", tokenize="cached")) == "cached"


def _cfg(folder: Path, out: Path, **kw: object) -> TrainConfig:
    return TrainConfig(**{"model": "var-tiny", "out_dir": str(out), "data": str(folder),
                          "recipe": "var", "steps": 3, "batch_size": 2, "lr": 1e-3,
                          "workers": 0, **kw})  # fmt: skip


@pytest.mark.slow  # three short trainings (~10 s on two cores)
def test_online_run_trains_and_resumes_exactly(folder: Path, tmp_path: Path) -> None:
    straight = train(_cfg(folder, tmp_path / "a"))
    assert not (tmp_path / "a" / "token_cache").exists()  # nothing was cached
    state = torch.load(straight, weights_only=True)
    assert state["trainer"]["step"] == 3 and state["args"]["tokenize"] == "auto"
    assert len(state["tokens_sha256"]) == 64
    cut = _cfg(folder, tmp_path / "b", stop_after=2, workers=2)  # workers change nothing
    train(cut)
    resumed = train(dataclasses.replace(cut, stop_after=None))
    a, b = load_transformer(straight, "var-tiny"), load_transformer(resumed, "var-tiny")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{k} differs after resume"
    strip = lambda p: [",".join(r.split(",")[:3]) for r in (p / "history.csv").read_text().splitlines()]
    assert strip(tmp_path / "a") == strip(tmp_path / "b") and len(strip(tmp_path / "a")) == 4
    # Switching to the cached tokens on resume is another run: refused before any work.
    with pytest.raises(TrainError, match="tokenize: saved 'auto', now 'cached'"):
        train(_cfg(folder, tmp_path / "a", tokenize="cached"))
    # Other images under the same settings: refused too (the images' listing is in the key).
    Image.new("RGB", (40, 40)).save(folder / "n02" / "img9.png")
    with pytest.raises(TrainError, match="training tokens differ"):
        train(_cfg(folder, tmp_path / "a"))


def test_online_with_tokens_is_refused() -> None:
    from mvar.data import TokenCache

    tokens = TokenCache([torch.zeros(1, 1, dtype=torch.long)], torch.zeros(1, dtype=torch.long))
    with pytest.raises(TrainError, match="online encodes images every step"):
        train(TrainConfig(tokenize="online"), tokens=tokens)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("tokenize", "fresh", "--tokenize must be one of auto, cached, online"),
     ("workers", -1, "--workers must be an integer >= 0")],
)  # fmt: skip
def test_bad_tokenize_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig(**{field: value})


def test_cli_bad_tokenize_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--tokenize", "fresh", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenize" in err[0] and "'fresh'" in err[0], err
    assert not (tmp_path / "run").exists()


# --- cached mode with K crops per image (--crops) ---------------------------------------------


def test_token_cache_batch_picks_the_crop_and_the_flip() -> None:
    from mvar.data import TokenCache

    # Three images, two crops each (rows k·3 + i), and their flipped views (+100).
    idx = torch.arange(12).view(6, 2)
    cache = TokenCache([idx], torch.tensor([7, 8, 9]), [idx + 100], crops=2)
    assert len(cache) == 3
    got, y = cache.batch(torch.tensor([2, 0, 2]), torch.tensor([False, True, False]), torch.tensor([1, 0, 0]))
    assert got[0].tolist() == [[10, 11], [100, 101], [4, 5]] and y.tolist() == [9, 7, 9]


@pytest.mark.slow  # encodes 4 images three times (~8 s on two cores)
def test_cache_of_k_crops_holds_k_draws_and_its_first_is_the_one_crop_cache(folder: Path,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    from mvar.build import build_vqvae
    from mvar.data import encode_shard, load_token_cache, token_cache_key

    torch.manual_seed(0)
    vae = build_vqvae(TINY_VAE).eval()
    data = imagenet_folder(folder, SIZE, "var")
    kw = {"recipe": "var", "image_size": SIZE, "flips": False, "seed": 0, "chunk": 3}
    one = load_token_cache(encode_shard(vae, data, tmp_path / "c", batch_size=2, **kw))
    two_dir = encode_shard(vae, data, tmp_path / "c", batch_size=2, crops=2, **kw)
    assert "crops" not in token_cache_key(vae, data, **kw)  # one-crop caches keep their old key
    two = load_token_cache(two_dir, token_cache_key(vae, data, crops=2, **kw))
    n = len(data)
    assert (len(one), one.crops, len(two), two.crops) == (n, 1, n, 2)
    assert torch.equal(two.labels, one.labels)
    for t1, t2 in zip(one.idx_Bl, two.idx_Bl):
        assert t2.shape == (2 * n, t1.shape[1]) and torch.equal(t2[:n], t1)
    # The second crop is another draw: the finest tokens differ for some image.
    assert not torch.equal(two.idx_Bl[-1][n:], two.idx_Bl[-1][:n])


@pytest.mark.slow  # tokenises 2 crops of 4 images, then 2 steps (~5 s on two cores)
def test_trainer_with_k_cached_crops(folder: Path, tmp_path: Path) -> None:
    path = train(_cfg(folder, tmp_path / "run", steps=2, tokenize="cached", crops=2))
    assert torch.load(path, weights_only=True)["trainer"]["step"] == 2
    (cache,) = (tmp_path / "run" / "token_cache").glob("tokens-*")
    assert '"crops": 2' in (cache / "manifest.json").read_text()


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"crops": 0}, "--crops must be a positive integer"),
     ({"crops": 2, "data": "/imagenet"}, "--crops 2 needs an image folder with --recipe var and --tokenize cached"),
     ({"crops": 2, "data": "/imagenet", "recipe": "mvar", "tokenize": "cached"}, "--crops 2 needs"),
     ({"crops": 2, "tokenize": "cached"}, "--crops 2 needs")],
)  # fmt: skip
def test_crops_outside_the_var_token_cache_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kw)


def test_recipe_auto_follows_the_architecture() -> None:
    # Each official trainer's own recipe unless one is named (docs/var.md §4.4, docs/mvar.md §3.3).
    assert TrainConfig(model="var-tiny").recipe == "var"
    assert TrainConfig(model="mvar-d16").recipe == "mvar"
    assert TrainConfig(model="mvar-tiny", recipe="var").recipe == "var"
    assert tokenize_mode(TrainConfig(model="var-d16", data="/imagenet")) == "online"
    assert tokenize_mode(TrainConfig(model="mvar-d16", data="/imagenet")) == "cached"
