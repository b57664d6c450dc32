"""Tokenizer training (``mvar/train_vae.py``, the quantizer's training forward in
``mvar/vqvae.py``) at CI size: the ``vae-micro`` preset (16 px, scales 1,2,4,8, 32 codes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mvar.checkpoint import load_vqvae
from mvar.cli import main as cli_main
from mvar.config import get_vae_preset
from mvar.data import SyntheticShapes
from mvar.train_vae import (
    VAETrainConfig,
    build_parser,
    main,
    psnr01,
    reconstruction_report,
    train_vae,
)
from mvar.vqvae import VQVAE

MICRO = get_vae_preset("vae-micro")
# 4 classes x 8 = 32 generated 16 px images; every test's run trains on them. Every loss and
# revival setting is pinned here, so the measured floors below do not move with the recipe.
BASE = VAETrainConfig(
    vae="vae-micro", steps=12, batch_size=8, lr=3e-3, warmup_steps=2, final_lr=0.1,
    grad_clip=1.0, beta=0.25, vq_weight=1.0, l1_weight=0.0, dead_threshold=0.03, dead_every=5,
    synthetic_classes=4, synthetic_per_class=8, ckpt_every=100, log_every=5, device="cpu",
)  # fmt: skip


def _micro(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(MICRO)


def _images(n: int = 8, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, 3, MICRO.image_size, MICRO.image_size) * 2 - 1


def _history(out: Path) -> list[dict[str, str]]:
    head, *rows = (out / "history.csv").read_text().splitlines()
    return [dict(zip(head.split(","), r.split(","))) for r in rows]


# --- the training forward ---------------------------------------------------------------


def test_training_forward_uses_the_same_codes_as_f_to_idx() -> None:
    vae = _micro().train()
    img = _images()
    out = vae(img)
    idx_Bl = vae.img_to_idx(img)
    for si, t in enumerate(idx_Bl):
        assert torch.equal(out.hit_SV[si], torch.bincount(t.flatten(), minlength=32).float()), si
        assert out.rest_nCv[si].shape == (8 * MICRO.patch_nums[si] ** 2, MICRO.Cvae)
    # The straight-through f̂ has the value of the tokens' f̂: decoding it is the reconstruction.
    with torch.no_grad():
        fhat = vae.idx_to_fhat(idx_Bl)
        rec = vae.decoder(vae.post_quant_conv(fhat))
    assert torch.allclose(out.rec_B3HW, rec, atol=1e-5, rtol=0)


def test_gradients_reach_encoder_decoder_codebook_and_phi() -> None:
    vae = _micro().train()
    img = _images()
    out = vae(img)
    (F.mse_loss(out.rec_B3HW, img) + out.vq_loss).backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"

    # Straight-through: the pixel loss alone trains encoder and decoder, not the codebook.
    vae.zero_grad(set_to_none=True)
    out = vae(img)
    F.mse_loss(out.rec_B3HW, img).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # through f̂_ste into f
    assert vae.quantize.embedding.weight.grad is None
    # The vq loss alone: commitment into the encoder, codebook term into codes and φ.
    vae.zero_grad(set_to_none=True)
    vae(img).vq_loss.backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert vae.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad is None


def test_vq_loss_is_commitment_plus_codebook_over_scales() -> None:
    vae = _micro().train()
    f = torch.randn(2, MICRO.Cvae, 8, 8)
    beta = 0.3
    got = vae.quantize(f, beta).vq_loss
    steps = list(vae.quantize._residual_scales(f))
    want = sum((1 + beta) * F.mse_loss(s.fhat_BCvNN, f) for s in steps) / len(steps)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


# --- usage statistics and dead codes ---------------------------------------------------


def test_usage_ema_follows_the_vectorquantizer2_schedule() -> None:
    q = _micro().quantize
    a, b = torch.rand(4, 32), torch.rand(4, 32)
    q.record_usage(a, step=0)
    assert torch.equal(q.ema_vocab_hit_SV, a)
    q.record_usage(b, step=1)
    assert torch.allclose(q.ema_vocab_hit_SV, 0.9 * a + 0.1 * b)
    q.record_usage(b, step=500)
    assert torch.allclose(q.ema_vocab_hit_SV, 0.99 * (0.9 * a + 0.1 * b) + 0.01 * b)


def test_dead_codes_are_revived_near_every_scales_residuals() -> None:
    vae = _micro().train()
    q = vae.quantize
    with torch.no_grad():  # every code but 0 far away: a collapsed codebook
        q.embedding.weight[1:] += 100.0
    f = torch.randn(4, MICRO.Cvae, 8, 8)
    out = q(f)
    assert (out.hit_SV > 0).sum(1).tolist() == [1, 1, 1, 1]
    q.record_usage(out.hit_SV, step=0)
    dead = q.dead_codes(threshold=0.03)
    assert dead.tolist() == list(range(1, 32))
    g = torch.Generator().manual_seed(0)
    q.replace_codes(dead, q.sample_residuals(out.rest_nCv, dead.numel(), g))
    assert torch.all(q.ema_vocab_hit_SV[:, dead] == 0)
    used = (q(f).hit_SV > 0).sum(1)
    assert torch.all(used >= 2), f"codes used per scale after revival: {used.tolist()}"
    assert int(used.sum()) >= 16


def test_revival_draws_each_scale_equally() -> None:
    q = _micro().quantize
    # Scale s's residual rows all equal s (1, 4, 16 and 64 rows): the draw tells the scale.
    rests = [torch.full((n, MICRO.Cvae), float(s)) for s, n in enumerate((1, 4, 16, 64))]
    new = q.sample_residuals(rests, 4000, torch.Generator().manual_seed(0))
    counts = torch.bincount(new.mean(1).round().long(), minlength=4)
    assert counts.tolist() and all(850 < c < 1150 for c in counts.tolist()), counts.tolist()
    again = q.sample_residuals(rests, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(new, again)  # seeded: deterministic


# --- the trainer -------------------------------------------------------------------------

# Floors per scale for the miniature run below (80 steps, usage over 256 held-out images).
# Without dead-code revival (dead_every=0) the codebook collapses to 2 codes in all (usage
# 0.031, 0.031, 0.062, 0.062), so the floors of scales 1-3 fail without it. Scale 0 (one token
# per image: the latent's mean) is NOT protected: revival does not stop it collapsing to one
# or two codes here (2 codes with 2 threads, 1 with 1 thread), so its floor is a single code.
USAGE_FLOOR = (1 / 32, 0.15, 0.2, 0.2)


@pytest.mark.slow
def test_loss_falls_and_usage_stays_above_floor(tmp_path: Path) -> None:
    cfg = dataclasses.replace(BASE, steps=80, dead_every=10, out_dir=str(tmp_path))
    path = train_vae(cfg)
    hist = _history(tmp_path)
    loss = [float(h["loss"]) for h in hist]
    assert len(loss) == 80
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5, f"loss {loss[:5]} -> {loss[-5:]}"
    assert sum(int(h["revived"]) for h in hist) > 0
    vae = load_vqvae(path, MICRO)
    # Usage over 256 held-out images (32 tokens at scale 0 made the 2-code floor a coin flip).
    data = SyntheticShapes(4, 64, 16, 1, texture=True, radius=(0.4, 0.7))
    rep = reconstruction_report(vae, data, batch_size=64)
    for si, (u, floor) in enumerate(zip(rep["usage_per_scale"], USAGE_FLOOR)):
        assert u >= floor, f"scale {si}: usage {u:.3f} below the floor {floor}"
    assert rep["psnr"] > 17.0


def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    straight = train_vae(dataclasses.replace(BASE, out_dir=str(tmp_path / "a")))
    cut = dataclasses.replace(BASE, out_dir=str(tmp_path / "b"), stop_after=7)
    assert not train_vae(cut).exists()  # no vae.pth before the last step
    resumed = train_vae(dataclasses.replace(cut, stop_after=None))
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and "quantize.ema_vocab_hit_SV" in a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    ha, hb = _history(tmp_path / "a"), _history(tmp_path / "b")
    assert strip(ha) == strip(hb) and len(ha) == 12
    assert sum(int(h["revived"]) for h in ha) > 0  # the window covers a revival

    # Resuming with other settings is refused, naming what changed.
    with pytest.raises(ValueError, match=r"other settings.*--lr 0\.003 \(saved\) vs 0\.001"):
        train_vae(dataclasses.replace(cut, lr=1e-3))
    other = SyntheticShapes(4, 8, 16, seed=5, texture=True, radius=(0.4, 0.7))
    with pytest.raises(ValueError, match="trained on other data"):
        train_vae(dataclasses.replace(cut, stop_after=None), data=other)


def test_vae_pth_loads_and_report_measures_it(tmp_path: Path) -> None:
    path = train_vae(dataclasses.replace(BASE, steps=3, out_dir=str(tmp_path)))
    vae = load_vqvae(path, MICRO)
    assert vae.quantize.ema_vocab_hit_SV.abs().sum() > 0  # usage statistics travel along
    img = _images(5)
    rep = reconstruction_report(vae, img, batch_size=2)
    with torch.no_grad():
        idx_Bl = vae.img_to_idx(img)
        rec = vae.fhat_to_img(vae.idx_to_fhat(idx_Bl))
    assert rep["num_images"] == 5
    assert rep["psnr"] == pytest.approx(float(psnr01(rec, img).mean()), rel=1e-5)
    assert rep["mse"] == pytest.approx(float(((rec - img) / 2).square().mean()), rel=1e-5)
    for si, pn in enumerate(MICRO.patch_nums):
        distinct = idx_Bl[si].unique().numel()
        assert rep["usage_per_scale"][si] == pytest.approx(distinct / min(32, 5 * pn * pn))
        assert 1 <= rep["perplexity_per_scale"][si] <= distinct + 1e-6
    assert rep["distinct_codes"] == torch.cat([t.flatten() for t in idx_Bl]).unique().numel()


# --- command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be > 0, got 0"),
        (["--batch-size", "-2"], "--batch-size must be > 0, got -2"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--beta", "-1"], "--beta must be >= 0"),
        (["--vae", "vae-huge"], "unknown --vae 'vae-huge'; valid: vae-micro, vae-paper, vae-tiny"),
        (["--data", "/no/such/folder"], "--data '/no/such/folder' is not a folder"),
    ],
)
def test_cli_rejects_bad_values_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as err:
        cli_main(["train-vae", "--out", str(tmp_path / "x"), *argv])
    text = str(err.value.code)
    assert text.startswith("mvar train-vae: error: ") and message in text
    assert "\n" not in text
    assert not (tmp_path / "x").exists()  # refused before any work


def test_cli_help_shows_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(VAETrainConfig):
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert "(default: 600)" in text and "(default: vae-tiny)" in text
    assert build_parser().parse_args([]).steps == VAETrainConfig().steps


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_agree_and_resume_exactly(tmp_path: Path) -> None:
    """torchrun with two gloo ranks: the ranks' states agree at every checkpoint (the trainer
    checks and raises otherwise), revival included, and an interrupted two-rank run resumes
    to the uninterrupted one's weights bit for bit."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    args = ["--vae", "vae-micro", "--steps", "6", "--batch-size", "8", "--dead-every", "2",
            "--synthetic-classes", "4", "--synthetic-per-class", "8", "--device", "cpu"]  # fmt: skip

    def run(out: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "mvar.train_vae", *args, "--out", str(tmp_path / out), *extra]  # fmt: skip
        done = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]

    run("a")
    run("b", "--stop-after", "3")
    run("b")
    a = torch.load(tmp_path / "a" / "vae.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "vae.pth", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a two-rank resume"
    assert sum(int(h["revived"]) for h in _history(tmp_path / "a")) > 0
