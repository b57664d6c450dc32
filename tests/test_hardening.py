"""Hostile and careless inputs (issue 10) and the fidelity keys of issue 11 (content-keyed
sample folders, the attention backend that ran, failures that fail, one-line CLI errors).

Every case is miniature: fake samplers, 8-32 px images, the tiny presets' random weights.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvar import generate as gen
from mvar import inception
from mvar.attention import BackendUnavailableError, na2d
from mvar.checkpoint import (
    CheckpointError,
    load_pretrained,
    load_transformer,
    load_vqvae,
    read_checkpoint,
)
from mvar.cli import one_line, run_command
from mvar.evaluate import evaluate, iter_images
from mvar.evaluate import main as evaluate_main
from mvar.generate import GenerationSettings, generate_samples, pack_npz, png_name
from mvar.io import atomic_write_json, progress, remove_stale_temps, safe_torch_load
from mvar.sampling import check_class_labels, check_sampling_settings
from tests.conftest import REPO_ROOT

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this calls open(marker, "w"): a file appears if the loader runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def evil_file(path: Path, marker: Path, base: dict[str, torch.Tensor] | None = None) -> Path:
    sd: dict[str, object] = dict(base or {"w": torch.zeros(2)})
    sd["zz_payload"] = _Evil(marker)
    torch.save(sd, path)
    return path


def tiny_settings(**kw: object) -> GenerationSettings:
    base: dict[str, object] = {"model": "fake", "checkpoint": "none", "guidance": 1.5, "top_k": 900,
                               "top_p": 0.96, "per_class": 3, "classes": (0, 1, 2),
                               "batch_size": 4}  # fmt: skip
    base.update(kw)
    return GenerationSettings(**base)  # type: ignore[arg-type]


class FakeSampler:
    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.calls: list[int] = []

    def sample(self, label_B: torch.Tensor, g_seed: int) -> torch.Tensor:
        self.calls.append(g_seed)
        g = torch.Generator().manual_seed(g_seed)
        return torch.rand(len(label_B), 3, self.size, self.size, generator=g)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return inception.save_random_inception_weights(
        tmp_path_factory.mktemp("inc") / "random-inception.pth", seed=0
    )


# --------------------------------------------------------------------------------------------
# Security: no weights file runs code, on any path that loads one
# --------------------------------------------------------------------------------------------


def test_evil_file_would_run_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The payload works (so the tests below can fail): an unsafe load creates the marker."""
    marker = tmp_path / "pwned"
    torch.load(evil_file(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_no_weights_path_unpickles_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_inception: Path
) -> None:
    marker = tmp_path / "pwned"
    inc_sd = torch.load(random_inception, weights_only=True)
    evil = evil_file(tmp_path / "evil.pth", marker)
    evil_inc = evil_file(tmp_path / "evil-inception.pth", marker, inc_sd)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    evil_file(hub / inception.WEIGHTS_FILENAME, marker, inc_sd)

    attempts = {
        "safe_torch_load": lambda: safe_torch_load(evil),
        "read_checkpoint (init-from, resume)": lambda: read_checkpoint(evil),
        "load_transformer": lambda: load_transformer(evil, "var-tiny"),
        "load_vqvae": lambda: load_vqvae(evil, "var-tiny"),
        "load_pretrained ckpt": lambda: load_pretrained("var-tiny", ckpt=evil),
        "load_pretrained vae": lambda: load_pretrained("var-tiny", vae_ckpt=evil),
        "generate.build_sampler": lambda: gen.build_sampler(
            "var-tiny", evil, None, gen.sampling_for("var-tiny", None, None, None)
        ),
        "--inception-weights": lambda: inception.InceptionExtractor(evil_inc).net,
    }
    for what, attempt in attempts.items():
        with pytest.raises(ValueError, match="refused"):
            attempt()
        assert not marker.exists(), what
    # The environment variable and torch-fidelity's own hub cache are read the same way.
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(evil_inc))
    with pytest.raises(ValueError, match="refused"):
        inception.InceptionExtractor().net
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ValueError, match="refused"):
        inception.InceptionExtractor().net
    assert not marker.exists()


def test_real_inception_weights_still_load_through_tensors(random_inception: Path) -> None:
    net = inception.InceptionExtractor(random_inception, label=inception.RANDOM_EXTRACTOR_LABEL)
    f = net.extract_batch(np.zeros((1, 16, 16, 3), np.uint8))
    assert f.pool.shape == (1, 2048) and f.logits.shape == (1, 1008)
    assert f.spatial.shape == (1, inception.SFID_DIM)
    sd = net.net.state_dict()
    ref = torch.load(random_inception, weights_only=True)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


# --------------------------------------------------------------------------------------------
# Checkpoints: unclear cases get clear messages
# --------------------------------------------------------------------------------------------


def test_checkpoint_misuse_messages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CheckpointError, match="is a directory; expected a .pth file"):
        load_transformer(tmp_path, "var-tiny")
    vae = tmp_path / "vae.pth"
    torch.save(load_pretrained("var-tiny")[0].state_dict(), vae)
    with pytest.raises(CheckpointError, match="looks like a VQ-VAE checkpoint"):
        load_transformer(vae, "var-tiny")
    tr = tmp_path / "tr.pth"
    sd = load_pretrained("var-tiny")[1].state_dict()
    torch.save(sd, tr)
    with pytest.raises(CheckpointError, match="is not a VQ-VAE checkpoint"):
        load_vqvae(tr, "var-tiny")
    # NaN weights load (a diverged run is worth inspecting) but never silently.
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key].clone().fill_(float("nan"))
    torch.save(sd, tr)
    with caplog.at_level(logging.WARNING):
        load_transformer(tr, "var-tiny")
    assert any("NaN or inf" in r.getMessage() and key in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Sampling settings, one place
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance, top_k, top_p, match",
    [
        (-0.5, 900, 0.96, "guidance"),
        (float("nan"), 900, 0.96, "guidance"),
        (1.5, -1, 0.96, "top_k"),
        (1.5, 900, 1.5, "top_p"),
        (1.5, 900, -0.1, "top_p"),
        (1.5, 900, float("nan"), "top_p"),
    ],
)
def test_bad_sampling_settings(guidance: float, top_k: int, top_p: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_sampling_settings(guidance, top_k, top_p)
    with pytest.raises(ValueError, match=match):
        tiny_settings(guidance=guidance, top_k=top_k, top_p=top_p)


def test_top_k_above_vocabulary_is_clamped_and_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mvar.sampling"):
        assert check_sampling_settings(1.5, 9000, 0.5, vocab_size=512) == 512
    assert "clamped to 512" in caplog.text
    assert check_sampling_settings(1.5, 100, 0.0, vocab_size=512) == 100
    assert check_sampling_settings(0.0, 0, 1.0) == 0  # boundaries are allowed


def test_class_out_of_range_is_refused_by_the_sampler() -> None:
    vae, model = load_pretrained("var-tiny")
    with pytest.raises(ValueError, match=r"class 1000 is out of range.*null class"):
        check_class_labels([0, 1000], 1000)
    with pytest.raises(ValueError, match="class -1 is out of range"):
        check_class_labels([-1], 1000)
    for label in (model.num_classes, -1):
        with pytest.raises(ValueError, match=f"class {label} is out of range"):
            model.sample(vae, torch.tensor([0, label]), guidance=1.5, top_k=10, top_p=0.9, g_seed=0)
    with pytest.raises(ValueError, match="guidance"):
        model.sample(vae, torch.tensor([0]), cfg=-1.0, g_seed=0)


# --------------------------------------------------------------------------------------------
# Dense neighbourhood attention keeps a NaN local
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["k", "v"])
def test_dense_confines_nan_like_the_reference(where: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 9, 4, generator=g) for _ in range(3))
    {"k": k, "v": v}[where][0, 1, 0, 0, 2] = float("nan")  # a corner key of head 1
    ref = na2d(q, k, v, 3, backend="reference")
    out = na2d(q, k, v, 3, backend="dense")
    nan_ref, nan_out = torch.isnan(ref).any(-1), torch.isnan(out).any(-1)
    assert nan_ref.sum() == 4  # queries (0..1, 0..1) of head 1 hold that key in their window
    assert torch.equal(nan_ref, nan_out)
    torch.testing.assert_close(out[~nan_out], ref[~nan_ref], atol=2e-5, rtol=2e-4)


# --------------------------------------------------------------------------------------------
# Sample folders: content keys, integrity, resume
# --------------------------------------------------------------------------------------------


def test_sample_folders_are_keyed_by_content(tmp_path: Path) -> None:
    a = tiny_settings(checkpoint="last", checkpoint_sha256="a" * 64, code_version="v1")
    b = tiny_settings(checkpoint="last", checkpoint_sha256="b" * 64, code_version="v1")
    vae2 = tiny_settings(checkpoint="last", checkpoint_sha256="a" * 64, vae_sha256="c" * 64)
    assert len({a.folder_name(), b.folder_name(), vae2.folder_name()}) == 3  # same file stem
    folder = generate_samples(FakeSampler(), a, tmp_path)
    saved = json.loads((folder / "settings.json").read_text())
    assert saved["checkpoint_sha256"] == "a" * 64 and saved["na_backend"] == "none"
    assert saved["content_key"] == a.content_key()
    # Re-running the same folder with other code: refused, then redone on request.
    newer = tiny_settings(checkpoint="last", checkpoint_sha256="a" * 64, code_version="v2")
    with pytest.raises(ValueError, match=r"differs in \['code_version', 'content_key'\].*--overwrite"):
        generate_samples(FakeSampler(), newer, tmp_path)
    sampler = FakeSampler()
    generate_samples(sampler, newer, tmp_path, overwrite=True)
    assert len(sampler.calls) == 3  # every batch sampled again
    assert json.loads((folder / "settings.json").read_text())["code_version"] == "v2"


def test_build_sampler_records_both_checkpoint_hashes(tmp_path: Path) -> None:
    vae, model = load_pretrained("mvar-tiny")
    torch.save(model.state_dict(), tmp_path / "last.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    s = gen.build_sampler("mvar-tiny", tmp_path / "last.pth", tmp_path / "vae.pth",
                          gen.sampling_for("mvar-tiny", None, None, None), "cpu", "float32",
                          "dense")  # fmt: skip
    assert s.provenance["checkpoint_sha256"] == inception.sha256_file(tmp_path / "last.pth")
    assert s.provenance["vae_sha256"] == inception.sha256_file(tmp_path / "vae.pth")
    assert s.provenance["na_backend"] == "dense" and s.provenance["device"] == "cpu"
    # A backend asked for by name that cannot run here is an error, not a quiet fallback.
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run here"):
        gen.build_sampler("mvar-tiny", None, None, gen.sampling_for("mvar-tiny", None, None, None),
                          "cpu", "float32", "cuda")  # fmt: skip


def test_damaged_pngs_are_not_counted_as_done(tmp_path: Path) -> None:
    s = tiny_settings()
    folder = generate_samples(FakeSampler(), s, tmp_path)
    good = (folder / png_name(5)).read_bytes()
    (folder / png_name(1)).write_bytes(b"")  # 0 bytes
    (folder / png_name(5)).write_bytes(good[: len(good) // 2])  # truncated
    sampler = FakeSampler()
    generate_samples(sampler, s, tmp_path)
    assert sampler.calls == [0, 1]  # batches 0 (images 0-3) and 1 (4-7) sampled again
    assert (folder / png_name(5)).read_bytes() == good


def test_evaluate_refuses_incomplete_or_mismatched_samples(tmp_path: Path) -> None:
    folder = generate_samples(FakeSampler(size=8), tiny_settings(), tmp_path / "s")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    no_weights = tmp_path / "no-inception.pth"  # never reached: inputs are checked first
    kw = {"inception_weights": no_weights, "device": "cpu", "is_splits": 2}
    # wrong resolution
    ref32 = tmp_path / "ref32.npz"
    np.savez(ref32, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="are 8x8 but the reference .* holds 32x32"):
        evaluate(folder, ref32, **kw)
    # pr_k 0
    with pytest.raises(ValueError, match="pr_k must be an integer >= 1"):
        evaluate(folder, ref, pr_k=0, **kw)
    # incomplete (settings.json says 9)
    (folder / png_name(8)).unlink()
    with pytest.raises(ValueError, match=r"incomplete: 1 of 9 images missing.*settings.json says 9"):
        evaluate(folder, ref, **kw)
    # numbering gap in a folder without settings.json
    (folder / "settings.json").unlink()
    (folder / png_name(3)).unlink()
    with pytest.raises(ValueError, match="incomplete.*numbering gaps"):
        evaluate(folder, ref, **kw)
    # a reference that is not a zip; an npz without arr_0
    bad = tmp_path / "ref-not-zip.npz"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=f"reference {bad} is not an npz"):
        evaluate(ref, bad, **kw)
    no_arr = tmp_path / "samples.npz"
    np.savez(no_arr, images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{no_arr} has no arr_0"):
        evaluate(no_arr, ref, **kw)


def test_truncated_png_error_names_the_file(tmp_path: Path) -> None:
    folder = generate_samples(FakeSampler(size=8), tiny_settings(), tmp_path)
    p = folder / png_name(4)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"image {p} is unreadable or truncated"):
        list(iter_images(folder, 4))


def test_evaluate_exits_nonzero_when_a_metric_errors_and_names_the_backend(
    tmp_path: Path, random_inception: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = tiny_settings(na_backend="numba", per_class=2, classes=(0, 1), batch_size=2)
    folder = generate_samples(FakeSampler(size=16), s, tmp_path / "s")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8))
    out, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    args = ["--samples", str(folder), "--reference", str(ref), "--inception-weights",
            str(random_inception), "--out", str(out), "--csv", str(csv_path), "--device", "cpu",
            "--is-splits", "2", "--batch-size", "4", "--fid-method", "eigh", "--pr-k", "1"]  # fmt: skip
    # --out a directory: refused before any feature is extracted
    with pytest.raises(ValueError, match="--out .* is a directory"):
        evaluate_main([*args[:-14], "--out", str(tmp_path)])  # type: ignore[list-item]

    def broken(*a: object, **k: object) -> None:
        raise ValueError("IS exploded")

    monkeypatch.setattr("mvar.evaluate.inception_score", broken)
    with pytest.raises(SystemExit) as e:
        run_command(evaluate_main, "evaluate", args)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metric(s) is failed: error: IS exploded" in err[0]
    res = json.loads(out.read_text())  # what was measured is kept
    assert res["fid_status"] == "ok" and res["is_status"].startswith("error")
    assert res["na_backend"] == "numba" and res["sample_dtype"] == "fp32"
    assert "numba" in csv_path.read_text().splitlines()[1]


# --------------------------------------------------------------------------------------------
# npz packing: space checked first, nothing left behind
# --------------------------------------------------------------------------------------------


def test_pack_npz_streams_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = generate_samples(FakeSampler(size=8), tiny_settings(), tmp_path)
    out = pack_npz(folder)
    with np.load(out) as z:
        assert z["arr_0"].shape == (9, 8, 8, 3)
        assert np.array_equal(z["arr_0"][4], np.asarray(Image.open(folder / png_name(4))))
    out.unlink()
    # not enough space: refused before writing anything
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="not enough free space"):
        pack_npz(folder)
    monkeypatch.undo()
    # failure mid-way (a damaged image): error names it, no npz, no temporary left
    (folder / png_name(6)).write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=f"{png_name(6)}: unreadable or truncated"):
        pack_npz(folder)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_output_files_follow_umask_and_stale_temps_are_removed(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644
    (tmp_path / ".x.json.abc123.tmp").write_text("half")
    (tmp_path / "keep.tmp").write_text("not ours")
    assert remove_stale_temps(tmp_path) == 1 and (tmp_path / "keep.tmp").exists()


# --------------------------------------------------------------------------------------------
# Backends: what ran, fallbacks said out loud
# --------------------------------------------------------------------------------------------


def test_fallback_warns_with_reason(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import mvar.attention as att
    from mvar.attention import numba_cpu

    monkeypatch.setattr(numba_cpu, "unavailable_reason", lambda *a, **k: "numba is broken here")
    monkeypatch.setattr(att, "_logged_choices", set())
    with caplog.at_level(logging.WARNING, logger="mvar.attention"):
        assert att.default_backend("cpu", torch.float32) == "dense"
    assert "wanted numba (numba is broken here)" in caplog.text and "'dense'" in caplog.text
    att.reset_backends_used()
    q = torch.randn(1, 1, 5, 5, 4)
    na2d(q, q, q, 3, backend="reference")
    assert att.backends_used() == {"reference": 1}
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run here"):
        na2d(q, q, q, 3, backend="cuda")


def test_numba_first_call_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from collections import Counter
    from types import SimpleNamespace

    from mvar.attention.numba_cpu import _first_call

    stats = SimpleNamespace(cache_path="/cache", cache_hits=Counter(), cache_misses=Counter())
    fake = SimpleNamespace(signatures=[], stats=stats)
    with caplog.at_level(logging.INFO, logger="mvar.attention.numba_cpu"):
        _first_call(fake, "na2d forward", lambda: None)
    assert "first call" in caplog.text and "compiled and cached" in caplog.text


def test_progress_logs_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    lg = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        assert list(progress(range(3), 3, "packing", lg, unit="img", every_s=1e-9)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert any("packing: 2/3 img" in m for m in lines) and "packing: done, 3 img" in lines[-1]


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _mvar(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvar.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
                          check=False, **kw)  # type: ignore[call-overload]  # fmt: skip


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = [
        (["generate", "--model", "var-tiny", "--classes", "-1"], "class -1 is out of range"),
        (["generate", "--model", "var-tiny", "--classes", "1000"], "class 1000 is out of range"),
        (["generate", "--model", "var-tiny", "--cfg", "-1"], "guidance (cfg) must be"),
        (["generate", "--model", "var-tiny", "--ckpt", str(tmp_path)], "is a directory"),
        (["generate", "--model", "var-tiny", "--top-p", "nan"], "top_p must be a number in [0, 1]"),
    ]
    for args, msg in bad:
        r = _mvar(*args, "--out-dir", str(tmp_path / "o"))
        assert r.returncode == 1, (args, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert len(errors) == 1 and errors[0].startswith("mvar generate: error: ") and msg in errors[0]
        assert r.stderr.strip().splitlines()[-1] == errors[0]
    r = _mvar("--debug", *bad[0][0], "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_cli_help_pipe_and_rank_logging() -> None:
    r = _mvar("generate", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: mvar generate")
    # `mvar presets | head -1`: the reader closes the pipe early; no BrokenPipeError traceback.
    p = subprocess.Popen([sys.executable, "-m", "mvar.cli", "presets"], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    assert p.stdout is not None and p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode() if p.stderr else ""
    assert p.wait(timeout=60) == 0 and "Traceback" not in err
    code = ("import logging; from mvar.cli import setup_logging; setup_logging(); "
            "logging.getLogger('x').info('INFO-LINE'); logging.getLogger('x').warning('WARN-LINE')")  # fmt: skip
    for rank, want_info in (("0", True), ("1", False)):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "RANK": rank,
                                "WORLD_SIZE": "2", "MVAR_DEBUG": ""}, check=True)  # fmt: skip
        assert ("INFO-LINE" in r.stderr) == want_info and "WARN-LINE" in r.stderr


def test_one_line_joins_multi_line_messages() -> None:
    assert one_line(ValueError("a\n  b\n")) == "a; b"
    assert one_line(KeyError("missing arr_0")) == "missing arr_0"
