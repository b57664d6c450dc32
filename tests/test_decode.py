"""The VQ-VAE decode inside sampling (issue 13): the in-place decoder gives the same bits as
the plain out-of-place formula, ``sample(decode=True)`` gives the same bits as decoding its f̂,
and the KV cache is freed before the decoder runs."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mvar.build import build_model
from mvar.sampling import decode_fhat
from mvar.vqvae import VQVAE, AttnBlock, Decoder, ResnetBlock


def _resnet_out_of_place(b: ResnetBlock, x: Tensor) -> Tensor:
    h = b.conv1(F.silu(b.norm1(x)))
    h = b.conv2(F.silu(b.norm2(h)))
    return (x if b.nin_shortcut is None else b.nin_shortcut(x)) + h


def _attn_out_of_place(a: AttnBlock, x: Tensor) -> Tensor:
    qkv = a.qkv(a.norm(x))
    B, _, H, W = qkv.shape
    q, k, v = qkv.reshape(B, 3, a.channels, H, W).unbind(1)
    w = torch.bmm(q.reshape(B, a.channels, -1).permute(0, 2, 1).contiguous(),
                  k.reshape(B, a.channels, -1).contiguous()) * a.w_ratio  # fmt: skip
    w = F.softmax(w, dim=2)
    h = torch.bmm(v.reshape(B, a.channels, -1).contiguous(), w.permute(0, 2, 1).contiguous())
    return x + a.proj_out(h.view(B, a.channels, H, W))


def decode_out_of_place(vae: VQVAE, fhat: Tensor) -> Tensor:
    """The decoder written without any in-place op (the code before issue 13), as
    ``decode_fhat`` returns it (in [0, 1]). Also the "before" cell of bench/bench_sampling.py."""
    d: Decoder = vae.decoder
    h = d.conv_in(vae.post_quant_conv(fhat))
    h = _resnet_out_of_place(d.mid.block_2,
                             _attn_out_of_place(d.mid.attn_1, _resnet_out_of_place(d.mid.block_1, h)))  # fmt: skip
    for i in reversed(range(len(d.up))):
        level = d.up[i]
        for j, block in enumerate(level.block):
            h = _resnet_out_of_place(block, h)
            if len(level.attn):
                h = _attn_out_of_place(level.attn[j], h)
        if i != 0:
            h = level.upsample(h)
    return d.conv_out(F.silu(d.norm_out(h))).clamp(-1, 1).add(1).mul(0.5)


@pytest.fixture(scope="module")
def vae_with_weights(tiny_vae: VQVAE) -> VQVAE:
    # Random GroupNorm affines and conv biases, so that no op is an identity by accident.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny_vae.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return tiny_vae


def test_in_place_decoder_is_bitwise_the_plain_formula(vae_with_weights: VQVAE) -> None:
    torch.manual_seed(2)
    N = vae_with_weights.cfg.patch_nums[-1]
    fhat = torch.randn(2, vae_with_weights.cfg.Cvae, N, N)
    with torch.no_grad():
        got = decode_fhat(vae_with_weights, fhat)
        want = decode_out_of_place(vae_with_weights, fhat)
    assert torch.equal(got, want)
    assert 0.0 < float(got.std())  # not a constant image


@pytest.mark.parametrize("preset", ["var-tiny", "mvar-tiny"])
def test_sample_decode_is_the_decode_of_its_fhat(vae_with_weights: VQVAE, preset: str) -> None:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    out = model.sample(vae_with_weights, torch.tensor([1, 4]), guidance=1.5, top_k=20, g_seed=0)
    assert out.img01 is not None
    assert torch.equal(out.img01, decode_fhat(vae_with_weights, out.fhat))


def test_kv_cache_is_freed_before_decode(
    vae_with_weights: VQVAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = build_model("var-tiny").eval()
    caches: list[weakref.ref] = []
    make_step = model.sampling_step

    def sampling_step():  # remember the KVCache behind the step (its ``nbytes`` is bound to it)
        step, nbytes = make_step()
        caches.append(weakref.ref(nbytes.__self__))
        return step, nbytes

    alive_at_decode: list[bool] = []
    fhat_to_img = vae_with_weights.fhat_to_img

    def spy(fhat: Tensor) -> Tensor:
        alive_at_decode.append(caches[-1]() is not None)
        return fhat_to_img(fhat)

    monkeypatch.setattr(model, "sampling_step", sampling_step)
    monkeypatch.setattr(vae_with_weights, "fhat_to_img", spy)
    out = model.sample(vae_with_weights, torch.tensor([3, 5]), guidance=1.5, g_seed=0)
    assert out.kv_cache_bytes > 0  # there was a cache, and it was measured before it went
    assert alive_at_decode == [False]


def test_channels_last_decoder_follows_its_weights_within_parity_tolerance(
    vae_with_weights: VQVAE,
) -> None:
    # Opt-in layout (``vae.to(memory_format=torch.channels_last)``): the decoder runs in the
    # weights' layout from f̂ on; the result is not bitwise but inside the parity tolerance.
    import copy

    torch.manual_seed(3)
    N = vae_with_weights.cfg.patch_nums[-1]
    fhat = torch.randn(2, vae_with_weights.cfg.Cvae, N, N)
    cl = copy.deepcopy(vae_with_weights).to(memory_format=torch.channels_last)
    seen: list[bool] = []
    hook = cl.decoder.conv_in.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        a, b = decode_fhat(vae_with_weights, fhat), decode_fhat(cl, fhat)
    hook.remove()
    assert seen == [True]
    assert (a - b).abs().max().item() <= 1e-3  # tests/test_parity.py IMG_TOL
