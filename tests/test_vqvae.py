"""The multi-scale residual VQ-VAE (``mvar/vqvae.py``, docs/var.md §1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mvar.config import PATCH_NUMS_512, TINY_VAE, VQVAEConfig
from mvar.vqvae import VQVAE, load_vqvae_state_dict, phi_indices
from tests.conftest import fixture_configs


def _tiny_vae(cfg: VQVAEConfig = TINY_VAE, seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(cfg).eval()


# --- parity with the official code -----------------------------------------------------


def test_matches_official_vqvae(parity_fixtures: list[dict[str, Any]]) -> None:
    for fx in parity_fixtures:
        vae = VQVAE(fixture_configs(fx["config"])[0]).eval()
        load_vqvae_state_dict(vae, fx["vae_state_dict"], source=fx["_path"])
        want = fx["vae"]
        img = fx["inputs"]["img"]

        idx_Bl = vae.img_to_idx(img)
        assert len(idx_Bl) == len(want["idx_Bl"])
        for si, (got, exp) in enumerate(zip(idx_Bl, want["idx_Bl"])):
            assert got.dtype == torch.int64
            n_diff = int((got != exp).sum())
            assert n_diff == 0, f"{fx['_path']}: scale {si}: {n_diff} tokens differ"

        with torch.no_grad():
            teacher = vae.idx_to_teacher_input(want["idx_Bl"])
            fhat = vae.idx_to_fhat(want["idx_Bl"])
            rec = vae.fhat_to_img(fhat)
        for name, got in (("teacher_input", teacher), ("fhat", fhat), ("rec", rec)):
            exp = want[name]
            assert got.shape == exp.shape, name
            err = (got - exp).abs().max().item()
            assert err <= 1e-4, f"{fx['_path']}: {name} differs by {err:.3g}"


# --- the φ table ----------------------------------------------------------------------


def test_phi_table_is_float64_argmin_with_ties() -> None:
    table = phi_indices(10, 4)
    assert table == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert _tiny_vae().phi_index == table
    # si = 2 and 7 tie exactly; float32 rounding breaks the ties the other way.
    assert phi_indices(10, 4, dtype=np.float32) != table
    # Other K use ticks linspace(1/(2K), 1-1/(2K), K): K = 2 -> (1/4, 3/4).
    assert phi_indices(10, 2) == (0,) * 5 + (1,) * 5
    assert phi_indices(10, 10) == tuple(range(10))


def test_phi_conv_used_per_scale_follows_table() -> None:
    vae = _tiny_vae()
    q = vae.quantize
    for si, k in enumerate(vae.phi_index):
        assert q.phi(si) is q.quant_resi.qresi_ls[k]


# --- geometry -------------------------------------------------------------------------


def test_512px_geometry() -> None:
    cfg = VQVAEConfig(vocab_size=512, ch=32, patch_nums=PATCH_NUMS_512)
    vae = _tiny_vae(cfg)
    img = torch.rand(1, 3, 512, 512) * 2 - 1
    idx_Bl = vae.img_to_idx(img)
    assert [t.shape for t in idx_Bl] == [(1, pn * pn) for pn in PATCH_NUMS_512]
    with torch.no_grad():
        teacher = vae.idx_to_teacher_input(idx_Bl)
        assert teacher.shape == (1, 2239, 32)
        fhat = vae.idx_to_fhat(idx_Bl)
        assert fhat.shape == (1, 32, 32, 32)
        rec = vae.fhat_to_img(fhat)
    assert rec.shape == (1, 3, 512, 512)
    assert rec.min() >= -1 and rec.max() <= 1


def test_wrong_image_size_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):  # the tiny VAE's 32 px
        _tiny_vae().img_to_idx(torch.zeros(1, 3, 128, 128))


def test_paper_vqvae_parameter_count() -> None:
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355


# --- loading --------------------------------------------------------------------------


def test_ema_buffer_of_another_length_loads() -> None:
    src = _tiny_vae(seed=1)
    sd = dict(src.state_dict())
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(7, TINY_VAE.vocab_size)
    dst = _tiny_vae(seed=2)
    load_vqvae_state_dict(dst, sd)
    assert dst.quantize.ema_vocab_hit_SV.shape == (7, TINY_VAE.vocab_size)
    assert torch.equal(dst.quantize.ema_vocab_hit_SV, sd["quantize.ema_vocab_hit_SV"])
    assert torch.equal(dst.quantize.embedding.weight, src.quantize.embedding.weight)
    assert torch.equal(dst.decoder.conv_out.weight, src.decoder.conv_out.weight)


def test_bad_state_dict_names_every_problem() -> None:
    vae = _tiny_vae()
    sd = dict(vae.state_dict())
    del sd["decoder.up.1.attn.1.qkv.weight"]  # the tiny VAE's lowest-resolution level is 1
    sd["quantize.embedding.weight"] = torch.zeros(4096, 16)
    sd["quant_conv.bias"] = torch.zeros(8)
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(10, 4096)  # wrong vocabulary
    sd["encoder.extra.weight"] = torch.zeros(1)
    before = vae.quantize.embedding.weight.clone()
    with pytest.raises(ValueError) as err:
        load_vqvae_state_dict(vae, sd, source="my_vae.pth")
    msg = str(err.value)
    assert "my_vae.pth" in msg
    assert "missing keys (1): decoder.up.1.attn.1.qkv.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "shape mismatches (3)" in msg
    assert "quantize.embedding.weight: expected (256, 16), found (4096, 16)" in msg
    assert "quant_conv.bias: expected (16,), found (8,)" in msg
    assert "quantize.ema_vocab_hit_SV: expected (10, 256), found (10, 4096)" in msg
    # Nothing was half-loaded.
    assert torch.equal(vae.quantize.embedding.weight, before)


# --- internal consistency -------------------------------------------------------------


def test_stepwise_ar_inputs_match_fhat_and_teacher_input() -> None:
    vae = _tiny_vae(seed=3)
    torch.manual_seed(4)
    size = vae.cfg.image_size
    img = torch.rand(2, 3, size, size) * 2 - 1
    idx_Bl = vae.img_to_idx(img)
    pns = vae.cfg.patch_nums
    with torch.no_grad():
        fhat = torch.zeros(2, vae.cfg.Cvae, pns[-1], pns[-1])
        rows = []
        for si, pn in enumerate(pns):
            before = fhat.clone()
            new_fhat, nxt = vae.next_ar_input(si, fhat, vae.embed(idx_Bl[si], pn))
            assert torch.equal(fhat, before), "next_ar_input must not modify f̂ in place"
            fhat = new_fhat
            if si < len(pns) - 1:
                assert nxt.shape == (2, vae.cfg.Cvae, pns[si + 1], pns[si + 1])
                rows.append(nxt.flatten(2).transpose(1, 2))
            else:
                assert nxt is fhat
        assert torch.allclose(vae.idx_to_fhat(idx_Bl), fhat, atol=1e-6, rtol=0)
        assert torch.allclose(
            vae.idx_to_teacher_input(idx_Bl), torch.cat(rows, dim=1), atol=1e-6, rtol=0
        )


def test_nearest_code_is_l2_argmin_with_first_index_on_ties() -> None:
    vae = _tiny_vae(seed=5)
    q = vae.quantize
    torch.manual_seed(6)
    z_nCv = torch.randn(300, vae.cfg.Cvae)
    brute_n = torch.cdist(z_nCv.double(), q.embedding.weight.double()).argmin(dim=1)
    assert torch.equal(q.nearest(z_nCv), brute_n)
    # Copy the winning code to index 0: the exact tie must go to the first index.
    win = int(brute_n[0])
    assert win != 0
    with torch.no_grad():
        q.embedding.weight[0] = q.embedding.weight[win]
    assert int(q.nearest(z_nCv[:1])) == 0
