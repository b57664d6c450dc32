"""Sample-set generation, npz packing, Inception features and the evaluate command.

The end-to-end test runs the real tiny VAR (random init) through ``python -m mvar.generate``
in one process (interrupted, then resumed) and under ``torchrun`` with two gloo processes, and
requires byte-identical images, then scores them with a random-weights Inception.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar import generate as gen
from mvar import inception
from mvar.evaluate import CSV_COLUMNS, append_csv, evaluate
from mvar.evaluate import main as evaluate_main
from mvar.generate import GenerationSettings, generate_samples, pack_npz, png_name, to_uint8
from mvar.inception import (
    RANDOM_EXTRACTOR_LABEL,
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    Features,
    InceptionExtractor,
)
from mvar.metrics import REFERENCE_URL, feature_statistics
from tests.conftest import REPO_ROOT


def tiny_settings(**kw: object) -> GenerationSettings:
    base: dict[str, object] = {
        "model": "fake", "checkpoint": "none", "guidance": 1.5, "top_k": 900, "top_p": 0.96,
        "per_class": 3, "classes": (0, 1, 2), "batch_size": 4,
    }  # fmt: skip
    base.update(kw)
    return GenerationSettings(**base)  # type: ignore[arg-type]


class FakeSampler:
    """Deterministic in (labels, g_seed) like the real sampler; records its calls."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.calls: list[tuple[list[int], int]] = []

    def sample(self, label_B: torch.Tensor, g_seed: int) -> torch.Tensor:
        self.calls.append((label_B.tolist(), g_seed))
        g = torch.Generator().manual_seed(g_seed)
        noise = torch.rand(len(label_B), 3, self.size, self.size, generator=g)
        return (noise + 0.1 * label_B.view(-1, 1, 1, 1)) % 1.0


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inception weights with the exact keys and variance-preserving random values."""
    return inception.save_random_inception_weights(
        tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0
    )


# --- settings, partition, uint8 -------------------------------------------------------------


def test_folder_name_encodes_every_setting() -> None:
    base = tiny_settings()
    changed = {
        "model": "other", "checkpoint": "ckpt2", "guidance": 2.0, "top_k": 1, "top_p": 0.5,
        "more_smooth": True, "seed": 7, "seed_mode": "fixed", "per_class": 4,
        "classes": (0, 1, 5), "batch_size": 3, "uint8": "truncate", "dtype": "bf16",
        "checkpoint_sha256": "ab" * 32, "vae_checkpoint": "vae2", "vae_sha256": "cd" * 32,
        "na_backend": "dense", "device": "cuda",
    }  # fmt: skip
    # code_version is recorded in settings.json and compared on resume, not in the name.
    assert set(changed) | {"code_version"} == {f.name for f in dataclasses.fields(GenerationSettings)}
    names = {base.folder_name()}
    for field, value in changed.items():
        names.add(dataclasses.replace(base, **{field: value}).folder_name())
    assert len(names) == len(changed) + 1
    assert "/" not in base.folder_name()


def test_global_partition_is_independent_of_world_size() -> None:
    s = tiny_settings(per_class=5, classes=(3, 1, 4), batch_size=4)
    labels = s.labels()
    assert labels.tolist() == [3] * 5 + [1] * 5 + [4] * 5  # class-ordered
    assert s.num_batches == 4
    covered = [i for b in range(s.num_batches) for i in s.batch_range(b)]
    assert covered == list(range(15))
    for world in (1, 2, 3):
        per_rank = [s.rank_batches(r, world) for r in range(world)]
        assert sorted(b for bs in per_rank for b in bs) == list(range(s.num_batches))
    assert [s.g_seed(b) for b in range(4)] == [0, 1, 2, 3]
    fixed = dataclasses.replace(s, seed=9, seed_mode="fixed")
    assert {fixed.g_seed(b) for b in range(4)} == {9}


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        tiny_settings(uint8="nearest")
    with pytest.raises(ValueError, match="per_class"):
        tiny_settings(per_class=0)


def test_to_uint8_round_and_truncate() -> None:
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 100.5 / 255, 254.7 / 255, 1.0, 1.3, -0.2])
    img = x.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    assert to_uint8(img, "round")[0, 0, :, 0].tolist() == [0, 0, 1, 101, 255, 255, 255, 0]
    assert to_uint8(img, "truncate")[0, 0, :, 0].tolist() == [0, 0, 0, 100, 254, 255, 255, 0]
    assert to_uint8(img).shape == (1, 1, 8, 3) and to_uint8(img).dtype == np.uint8


# --- generation with a fake sampler ---------------------------------------------------------


def test_interrupted_generation_resumes_to_identical_files(tmp_path: Path) -> None:
    s = tiny_settings()  # 9 images, batches of 4, 4, 1
    full = generate_samples(FakeSampler(), s, tmp_path / "full")

    sampler = FakeSampler()
    part = generate_samples(sampler, s, tmp_path / "resumed", max_batches=1)
    assert len(sampler.calls) == 1 and len(list(part.glob("*.png"))) == 4
    sampler = FakeSampler()
    generate_samples(sampler, s, tmp_path / "resumed")
    assert [seed for _, seed in sampler.calls] == [1, 2]  # batch 0 was complete: skipped
    assert folder_bytes(part) == folder_bytes(full) and len(folder_bytes(full)) == 9

    # A batch with a missing image (crash mid-batch) is sampled again, identically.
    (part / png_name(5)).unlink()
    (part / ".000006.png.tmp").write_bytes(b"half a file")
    sampler = FakeSampler()
    generate_samples(sampler, s, tmp_path / "resumed")
    assert sampler.calls == [([1, 1, 2, 2], 1)]
    assert folder_bytes(part) == folder_bytes(full)
    assert not list(part.glob(".*.tmp"))
    assert json.loads((part / "settings.json").read_text())["num_images"] == 9


def test_folder_with_other_settings_is_refused(tmp_path: Path) -> None:
    s = tiny_settings()
    folder = generate_samples(FakeSampler(), s, tmp_path, max_batches=0)
    other = json.loads((folder / "settings.json").read_text())
    other["top_k"] = 5
    (folder / "settings.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"other settings \(differs in \['top_k'\]: .*--overwrite"):
        generate_samples(FakeSampler(), s, tmp_path)


def test_sampler_output_shape_is_checked(tmp_path: Path) -> None:
    class Bad(FakeSampler):
        def sample(self, label_B: torch.Tensor, g_seed: int) -> torch.Tensor:
            return super().sample(label_B, g_seed)[:1]

    with pytest.raises(ValueError, match=r"for a batch of 4; expected \(4, 3, H, W\)"):
        generate_samples(Bad(), tiny_settings(), tmp_path)


def test_pack_npz_order_and_checks(tmp_path: Path) -> None:
    folder = generate_samples(FakeSampler(size=6), tiny_settings(), tmp_path)
    out = pack_npz(folder)
    assert out == folder.with_name(folder.name + ".npz")
    with np.load(out) as z:
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (9, 6, 6, 3)
    for i in range(9):
        np.testing.assert_array_equal(arr[i], np.asarray(Image.open(folder / png_name(i))))
    assert not list(tmp_path.glob(".*tmp*"))

    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(folder / png_name(4))
    with pytest.raises(ValueError, match="differs from 000000.png"):
        pack_npz(folder, tmp_path / "x.npz")
    (folder / png_name(4)).unlink()
    with pytest.raises(ValueError, match=r"1 of 9 images missing \(first: \['000004.png'\]\)"):
        pack_npz(folder, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_image_sources_folder_and_npz(tmp_path: Path) -> None:
    from mvar.evaluate import count_images, iter_images

    folder = generate_samples(FakeSampler(size=6), tiny_settings(), tmp_path)
    npz = pack_npz(folder)
    (folder / "notes.txt").write_text("not an image")
    for src in (folder, npz):
        assert count_images(src) == 9
        got = np.concatenate(list(iter_images(src, 4)))
        np.testing.assert_array_equal(got, np.load(npz)["arr_0"])
    # Any folder of images (sorted by name), but one resolution only.
    other = tmp_path / "jpegs"
    other.mkdir()
    for name, size in (("b.jpg", 8), ("a.png", 8), ("c.jpeg", 9)):
        Image.fromarray(np.full((size, size, 3), 7, np.uint8)).save(other / name)
    assert count_images(other) == 3
    assert next(iter_images(other, 2)).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="different sizes"):
        list(iter_images(other, 3))


# --- Inception: random weights, missing / wrong weights -------------------------------------


def test_random_inception_weights_load_strictly_and_do_not_collapse(random_inception: Path) -> None:
    ex = InceptionExtractor(random_inception, batch_size=3, label=RANDOM_EXTRACTOR_LABEL)
    assert ex.info.label == RANDOM_EXTRACTOR_LABEL and not ex.info.official
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    imgs[2] = 30
    imgs[3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None]
    feats = ex.extract([imgs[:1], imgs[1:]])  # re-batched to 3 + 1
    assert feats.pool.shape == (4, 2048) and feats.logits.shape == (4, 1008)
    assert feats.spatial.shape == (4, inception.SFID_DIM) and (feats.spatial >= 0).all()
    assert np.isfinite(feats.pool).all() and (feats.pool >= 0).all()  # ReLU then average pool
    # Different images give clearly different features (default init would give ~0 here).
    spread = feats.pool.std(axis=0).mean() / feats.pool.mean()
    assert spread > 0.05
    assert feats.logits.std(axis=0).mean() > 1e-3
    part = ex.extract_batch(imgs[2:])  # another batch composition, same features
    np.testing.assert_allclose(part.pool, feats.pool[2:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.spatial, feats.spatial[2:], rtol=1e-5, atol=1e-6)


def test_sfid_feature_is_mixed_6d_branch1x1_in_nhwc_order(random_inception: Path) -> None:
    # docs/evaluation.md §3.5: the ADM evaluator's mixed_6/conv:0[..., :7], flattened in TF's
    # NHWC order, is torch-fidelity's Mixed_6d.branch1x1 output (after its ReLU).
    ex = InceptionExtractor(random_inception, batch_size=2, label=RANDOM_EXTRACTOR_LABEL)
    net = ex.net
    raw: list[torch.Tensor] = []
    h = net.get_submodule("Mixed_6d.branch1x1").register_forward_hook(
        lambda _m, _a, out: raw.append(out.detach().clone())
    )
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 64, 64), dtype=np.uint8))
    try:
        with torch.no_grad(), inception.SfidCapture(net) as cap:
            net(x)
    finally:
        h.remove()
    (feat,) = cap.batches
    (m,) = raw
    assert m.shape == (2, 192, 17, 17) and (m >= 0).all()  # after the ReLU
    assert feat.shape == (2, inception.SFID_DIM) == (2, 2023)
    manual = m.permute(0, 2, 3, 1)[..., :7].reshape(2, -1).double().numpy()
    np.testing.assert_array_equal(feat, manual)
    # Element order: flat index (h·17 + w)·7 + c holds channel c at row h, column w.
    for n, hh, ww, c in [(0, 0, 0, 6), (1, 3, 16, 0), (1, 16, 2, 4)]:
        assert feat[n, (hh * 17 + ww) * 7 + c] == float(m[n, c, hh, ww])
    assert not np.array_equal(feat, m[:, :7].reshape(2, -1).double().numpy())  # not NCHW
    with pytest.raises(ValueError, match="17"):
        inception.sfid_flatten(torch.zeros(1, 192, 8, 8))


@pytest.fixture(scope="module")
def sfid_sets(
    tmp_path_factory: pytest.TempPathFactory, random_inception: Path
) -> dict[str, object]:
    """Small sample and reference image npz files at 32 px and the reference's features."""
    d = tmp_path_factory.mktemp("sfid")
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    ref[:, :16] //= 3  # structure, so the two sets differ in distribution
    np.savez(d / "samples.npz", arr_0=samples)
    np.savez(d / "ref_images.npz", arr_0=ref)
    ex = InceptionExtractor(random_inception, batch_size=4, label=RANDOM_EXTRACTOR_LABEL)
    return {"dir": d, "ref": ref, "ref_feats": ex.extract([ref])}


def _eval_kw(random_inception: Path, cache: Path) -> dict[str, object]:
    return {
        "inception_weights": random_inception, "extractor_label": RANDOM_EXTRACTOR_LABEL,
        "device": "cpu", "batch_size": 4, "is_splits": 2, "pr_k": 2, "cache_dir": cache,
        "fid_method": "eigh",
    }  # fmt: skip


@pytest.mark.slow  # ~40 s on 2 free cores (eigendecompositions, 299 px forwards)
def test_sfid_reference_statistics_paths(sfid_sets: dict, random_inception: Path) -> None:
    # Each evaluate() costs two 2048-d and two 2023-d eigendecompositions: kept to five calls.
    d: Path = sfid_sets["dir"]  # type: ignore[assignment]
    ref, feats = sfid_sets["ref"], sfid_sets["ref_feats"]
    kw = _eval_kw(random_inception, d / "cache")
    mu, sigma = feature_statistics(feats.pool)
    mu_s, sigma_s = feature_statistics(feats.spatial)
    # Precomputed statistics of the reference images, without the images: sFID can only come
    # from mu_s/sigma_s, and must equal the sFID computed from the images themselves.
    stats = d / "ref_stats.npz"
    np.savez(stats, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    no_mu_s = d / "ref_no_mu_s.npz"  # mu/sigma and images, no spatial statistics
    np.savez(no_mu_s, mu=mu, sigma=sigma, arr_0=ref)
    samples, images = d / "samples.npz", d / "ref_images.npz"

    r_img = evaluate(samples, images, **kw)  # type: ignore[arg-type]
    r_stats = evaluate(samples, stats, **kw)  # type: ignore[arg-type]
    r_no = evaluate(samples, no_mu_s, **kw)  # type: ignore[arg-type]
    assert r_stats["sfid_reference"] == "precomputed mu_s/sigma_s of the reference npz"
    assert r_img["sfid_reference"] == r_no["sfid_reference"] == (
        "spatial statistics of the reference images"
    )
    for r in (r_img, r_stats, r_no):
        assert r["sfid_status"] == "ok" and r["sfid_feature"] == inception.SFID_FEATURE
    assert np.isfinite(r_img["sfid"]) and r_img["sfid"] > 1e-3
    assert r_stats["sfid"] == pytest.approx(r_img["sfid"], rel=1e-9)
    assert r_no["sfid"] == pytest.approx(r_img["sfid"], rel=1e-9)
    # sFID is its own statistic, not FID under another name.
    assert r_img["sfid"] != pytest.approx(r_img["fid"], rel=1e-3)

    # A set against itself: ~0 (the same statistics on both sides).
    r_self = evaluate(images, images, **kw)  # type: ignore[arg-type]
    assert abs(r_self["sfid"]) < 1e-6 * r_img["sfid"] and abs(r_self["fid"]) < 1e-6 * r_img["fid"]

    # Neither mu_s nor images: not measured (not an error).
    np.savez(stats, mu=mu, sigma=sigma)
    r_none = evaluate(samples, stats, **kw)  # type: ignore[arg-type]
    assert r_none["sfid"] is None and r_none["sfid_status"].startswith("not measured:")
    # mu_s of the wrong size: one clear error before any extraction.
    np.savez(stats, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(ValueError, match=r"mu_s has shape \(3,\), expected \(2023,\)"):
        evaluate(samples, stats, **kw)  # type: ignore[arg-type]


@pytest.mark.slow  # ~40 s on 2 free cores (eigendecompositions, 299 px forwards)
def test_feature_cache_without_spatial_is_not_reused(
    sfid_sets: dict, random_inception: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mvar.evaluate import extract_source

    d: Path = sfid_sets["dir"]  # type: ignore[assignment]
    cache = d / "old_cache"
    ex = InceptionExtractor(random_inception, batch_size=4, label=RANDOM_EXTRACTOR_LABEL)
    src = d / "ref_images.npz"
    fresh = extract_source(src, ex, cache)
    (path,) = cache.glob("features-*.npz")
    assert sorted(np.load(path).files) == ["logits", "pool", "spatial"]
    np.savez(path, pool=fresh.pool, logits=fresh.logits)  # as written before sFID existed
    with pytest.raises(inception.FeatureCacheError, match="lacks \\['spatial'\\]"):
        Features.load(path)
    with caplog.at_level("WARNING", logger="mvar.evaluate"):
        again = extract_source(src, ex, cache)
    assert "lacks ['spatial']" in caplog.text and "extracting the features" in caplog.text
    np.testing.assert_array_equal(again.spatial, fresh.spatial)
    assert "spatial" in np.load(path).files  # rewritten complete


def test_inception_url_is_torch_fidelitys() -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert WEIGHTS_URL == URL_INCEPTION_V3
    assert URL_INCEPTION_V3.endswith(WEIGHTS_FILENAME)


def test_missing_inception_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as e:
        InceptionExtractor()
    msg = str(e.value)
    assert WEIGHTS_FILENAME in msg and WEIGHTS_URL in msg and WEIGHTS_ENV in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME) in msg

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "from_env.pth"))
    with pytest.raises(FileNotFoundError, match="from_env.pth"):
        InceptionExtractor()
    with pytest.raises(FileNotFoundError, match=r"nope\.pth \(--inception-weights\)"):
        InceptionExtractor(tmp_path / "nope.pth")


def test_inception_weights_hash_check(random_inception: Path) -> None:
    with pytest.warns(UserWarning, match="does not start with 6726825d"):
        info = inception.verify_weights(random_inception)
    assert info.sha256 and "unverified" in info.label
    with pytest.raises(ValueError, match="strict hash check"):
        inception.verify_weights(random_inception, strict_hash=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the labelled random weights do not warn
        inception.verify_weights(random_inception, label=RANDOM_EXTRACTOR_LABEL)


# --- errors of the evaluate / generate entry points -----------------------------------------


def test_missing_reference_error(tmp_path: Path, random_inception: Path) -> None:
    samples = pack_npz(generate_samples(FakeSampler(), tiny_settings(), tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        evaluate(samples, tmp_path / "VIRTUAL_imagenet256_labeled.npz",
                 inception_weights=random_inception)  # fmt: skip
    msg = str(e.value)
    assert "VIRTUAL_imagenet256_labeled.npz" in msg and REFERENCE_URL in msg
    assert str(tmp_path) in msg
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(2))
    with pytest.raises(KeyError, match=r"neither mu/sigma nor arr_0 \(it has \['mu'\]\)"):
        evaluate(samples, bad, inception_weights=random_inception)


def test_missing_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        gen.build_sampler(
            "var-d16", "var_d16.pth", None, gen.sampling_for("var-d16", None, None, None)
        )
    msg = str(e.value)
    assert "var_d16.pth" in msg and str(tmp_path) in msg
    assert "https://huggingface.co/FoundationVision/var/resolve/main/var_d16.pth" in msg
    with pytest.raises(FileNotFoundError, match="vae_ch160v4096z32.pth"):
        gen.main(
            [
                "--model",
                "var-tiny",
                "--vae-ckpt",
                "vae_ch160v4096z32.pth",
                "--out-dir",
                str(tmp_path),
            ]
        )


# --- the whole pipeline with the real tiny model --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pipeline_one_vs_two_processes_and_resume(
    tmp_path: Path, random_inception: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    # 2 classes x 3 = 6 images, batches of 4 + 2 (a short last batch).
    args = ["--model", "var-tiny", "--num-classes", "2", "--per-class", "3", "--batch-size", "4",
            "--seed", "3", "--device", "cpu"]  # fmt: skip

    # One process, interrupted after one batch, then resumed. Intra-op threads change float
    # rounding in the model (a few pixels by 1/255), so every run here uses 1 thread, as
    # torchrun's workers do (OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = gen.main([*args, "--out-dir", str(tmp_path / "one"), "--max-batches", "1", "--npz"])
        assert len(list(one.glob("*.png"))) == 4 and not one.with_name(one.name + ".npz").exists()
        gen.main([*args, "--out-dir", str(tmp_path / "one"), "--npz"])
    finally:
        torch.set_num_threads(threads)

    # Two processes under torchrun (gloo).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "mvar.generate", *args, "--out-dir", str(tmp_path / "two"), "--npz"]  # fmt: skip
    run = subprocess.run(
        cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Rank 0 logs; rank 1 logs warnings only (each line once). Rank 1's batches exist below.
    assert "rank 0/2" in run.stderr and "rank 1/2" not in run.stderr
    two = tmp_path / "two" / one.name
    assert folder_bytes(one) == folder_bytes(two) and len(folder_bytes(one)) == 6
    npz_one, npz_two = one.with_name(one.name + ".npz"), two.with_name(two.name + ".npz")
    with np.load(npz_one) as a, np.load(npz_two) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        assert a["arr_0"].shape == (6, 32, 32, 3)
        assert len({a["arr_0"][i].tobytes() for i in range(6)}) == 6  # not one image repeated

    # Metrics: an ADM-style reference (precomputed mu/sigma + images) built from a few
    # synthetic images, the random-weights Inception, and the npz vs the folder.
    rng = np.random.default_rng(0)
    # At the samples' 32 px (the tiny VAE): sets at different resolutions are refused (test_hardening).
    ref_imgs = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    ref_imgs[:, :128] //= 4  # some structure, so the reference features differ from noise
    cache = tmp_path / "features"
    ex = InceptionExtractor(random_inception, label=RANDOM_EXTRACTOR_LABEL)
    ref_feats = ex.extract([ref_imgs])
    mu, sigma = feature_statistics(ref_feats.pool)
    mu_s, sigma_s = feature_statistics(ref_feats.spatial)
    adm_ref = tmp_path / "ref_adm.npz"
    np.savez(adm_ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=ref_imgs)
    images_ref = tmp_path / "ref_images.npz"
    np.savez(images_ref, arr_0=ref_imgs)

    # fid_method="eigh": the same number as sqrtm for covariances (test_metrics), but sqrtm at
    # d = 2048 takes ~45 s on 2 busy cores.
    kw = {
        "inception_weights": random_inception, "extractor_label": RANDOM_EXTRACTOR_LABEL,
        "device": "cpu", "batch_size": 4, "is_splits": 2, "cache_dir": cache,
        "fid_method": "eigh",
    }  # fmt: skip
    r_npz = evaluate(npz_one, adm_ref, **kw)  # type: ignore[arg-type]
    r_dir = evaluate(two, adm_ref, **kw)  # type: ignore[arg-type]
    r_img = evaluate(npz_one, images_ref, **kw)  # type: ignore[arg-type]
    for key in ("fid", "sfid", "is_mean", "is_std", "precision", "recall"):
        assert r_npz[key] == r_dir[key], key
        assert r_npz[key] is not None and np.isfinite(r_npz[key]), key
    # FID against precomputed statistics == FID against the same images' statistics.
    assert r_npz["fid"] == pytest.approx(r_img["fid"], rel=1e-9)
    assert r_npz["fid"] > 0 and r_npz["fid_reference"].startswith("precomputed")
    assert r_img["fid_reference"].startswith("statistics of the reference images")
    assert r_npz["num_samples"] == 6 and r_npz["num_reference_images"] == 4
    # The same for sFID (mu_s/sigma_s vs the images' spatial features).
    assert r_npz["sfid"] == pytest.approx(r_img["sfid"], rel=1e-9) and r_npz["sfid"] > 0
    assert r_npz["sfid_status"] == "ok" and r_npz["sfid_reference"].startswith("precomputed")
    assert r_npz["sfid_feature"] == inception.SFID_FEATURE
    assert r_npz["extractor"] == RANDOM_EXTRACTOR_LABEL
    assert r_npz["samples_settings"]["model"] == "var-tiny"
    assert r_npz["inception_weights_sha256"] == inception.sha256_file(random_inception)
    # Cached features are exactly what a fresh extraction gives.
    fresh = ex.extract([np.load(npz_one)["arr_0"]])
    cached = [Features.load(p) for p in sorted(cache.glob("features-*.npz"))]
    assert len(cached) == 4  # npz_one, folder two, ref_adm, ref_images
    assert any(
        np.array_equal(c.pool, fresh.pool) and np.array_equal(c.spatial, fresh.spatial)
        for c in cached
    )

    # The command line: JSON + CSV row (features from the cache); a second row is appended.
    out_json, out_csv = tmp_path / "res.json", tmp_path / "res.csv"
    cli = ["--samples", str(npz_one), "--reference", str(adm_ref), "--inception-weights",
           str(random_inception), "--out", str(out_json), "--csv", str(out_csv), "--device", "cpu",
           "--is-splits", "2", "--batch-size", "4", "--cache-dir", str(cache),
           "--fid-method", "eigh"]  # fmt: skip
    with pytest.warns(UserWarning, match="not be comparable"):
        evaluate_main(cli)
    res = json.loads(out_json.read_text())
    assert res["fid"] == r_npz["fid"] and res["reference_sha256"] and res["fid_method"] == "eigh"
    assert res["sfid"] == r_npz["sfid"]
    append_csv(res, out_csv)
    lines = out_csv.read_text().splitlines()
    assert lines[0].split(",") == list(CSV_COLUMNS) and len(lines) == 3
    assert lines[1] == lines[2]


# --- repro/table1.py ------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _table1_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for k in (WEIGHTS_ENV, "MVAR_REFERENCE_NPZ", "MVAR_CHECKPOINT_DIR", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def test_table1_missing_files_give_not_measured_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_inception: Path
) -> None:
    from repro import table1

    _table1_env(tmp_path, monkeypatch)
    table1.main(["--out-dir", "reports", "--work-dir", "work"])
    rows = _read_rows(tmp_path / "reports" / "table1.csv")
    assert [(r["model"], r["metric"]) for r in rows] == [
        (m, k)
        for m in ("var-d16", "mvar-scratch-d16")
        for k in ("fid", "is", "precision", "recall", "sfid")
    ]
    for r in rows:
        assert r["value"] == "" and r["method"] == "none" and r["table"] == "table1"
        ckpt = "var_d16.pth" if r["model"] == "var-d16" else "mvar-d16.pth"
        assert r["status"] == (
            f"not measured: missing {ckpt}, vae_ch160v4096z32.pth, "
            "weights-inception-2015-12-05-6726825d.pth, VIRTUAL_imagenet256_labeled.npz"
        )
    # The paper prints no sFID: its paper value is empty.
    assert [float(r["paper_value"]) if r["paper_value"] else None for r in rows] == [
        3.55, 280.4, 0.84, 0.51, None, 3.09, 285.5, 0.85, 0.51, None,
    ]  # fmt: skip
    md = (tmp_path / "reports" / "table1.md").read_text()
    assert "not measured: missing var_d16.pth" in md and REFERENCE_URL in md and WEIGHTS_URL in md
    assert f"sfid_feature: {inception.SFID_FEATURE}" in md and "inferred" in md

    # With the weights and the reference present, only the checkpoints are reported missing.
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    table1.main(["--out-dir", "reports", "--work-dir", "work", "--inception-weights",
                 str(random_inception), "--reference", str(tmp_path / "ref.npz")])  # fmt: skip
    rows = _read_rows(tmp_path / "reports" / "table1.csv")
    assert rows[0]["status"] == "not measured: missing var_d16.pth, vae_ch160v4096z32.pth"

