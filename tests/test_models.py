"""VAR and MVAR behaviour beyond the fixtures: KV cache vs teacher forcing, the scale-Markov
property, presets, geometry and sampling semantics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar.build import build_model, build_vqvae
from mvar.config import PRESETS, get_preset, list_presets
from mvar.sampling import guidance_weight, top_k_top_p_filter_

PAPER_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}


def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name)
    # The from-scratch init shrinks every residual branch to 1e-5; open them up so that the
    # attention pattern visibly matters and the tests below can fail.
    model.init_weights(init_adaln_gamma=1.0, init_head=1.0)
    return model.eval()


def _teacher_input(vae: torch.nn.Module, B: int, seed: int = 0) -> tuple[list, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    V = vae.cfg.vocab_size
    idx_Bl = [torch.randint(V, (B, pn * pn), generator=g) for pn in vae.cfg.patch_nums]
    return idx_Bl, vae.idx_to_teacher_input(idx_Bl)


# --- VAR: the KV cache computes exactly what teacher forcing computes ------------------------


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_var_kv_cache_equals_teacher_forcing(tiny_vae: torch.nn.Module, guidance: float) -> None:
    model = _tiny("var-tiny")
    label = torch.tensor([3, 9])
    out = model.sample(tiny_vae, label, guidance=guidance, top_k=50, top_p=0.9, g_seed=1,
                       record_logits=True, decode=False)  # fmt: skip
    x = tiny_vae.idx_to_teacher_input(out.idx_Bl)
    with torch.no_grad():
        cond = model(label, x)
        uncond = model(torch.full_like(label, model.num_classes), x)
    S = len(model.patch_nums)
    for si, (bg, ed) in enumerate(model.begin_ends):
        t = guidance_weight(guidance, si, S)
        want = (1 + t) * cond[:, bg:ed] - t * uncond[:, bg:ed]
        err = (out.guided_logits[si] - want).abs().max().item()
        assert err < 1e-4, f"scale {si}: KV-cache logits differ from teacher forcing by {err}"
    assert out.guided and out.kv_cache_bytes > 0


def test_var_kv_cache_bytes_match_geometry(tiny_vae: torch.nn.Module) -> None:
    model = _tiny("var-tiny")
    B = 3
    out = model.sample(tiny_vae, torch.arange(B), guidance=1.5, g_seed=0, decode=False)
    c = model.config
    # K and V of all L tokens, every layer, 2B rows (CFG), fp32.
    assert out.kv_cache_bytes == 2 * c.depth * 2 * B * c.seq_len * c.embed_dim * 4


# --- MVAR: scales are independent ------------------------------------------------------------


def test_mvar_packed_scales_equal_per_scale_forwards(tiny_vae: torch.nn.Module) -> None:
    model = _tiny("mvar-tiny")
    label = torch.tensor([5, 6])
    _, x = _teacher_input(tiny_vae, 2)
    with torch.no_grad():
        packed = model(label, x)  # scales 0..7 packed, 8 and 9 alone
        alone = torch.cat([model(label, x, scales=[si]) for si in range(len(model.patch_nums))], 1)
        chunk = model(label, x, scales=range(8))
    assert model.forward_groups(range(10)) == [list(range(8)), [8], [9]]
    assert (packed - alone).abs().max().item() < 1e-5
    assert (chunk - alone[:, : model.begin_ends[7][1]]).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def mvar_tiny() -> torch.nn.Module:
    return _tiny("mvar-tiny", seed=1)


@settings(max_examples=12, deadline=None)
@given(s=st.integers(0, 9), other=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_mvar_scale_logits_ignore_other_scales(
    mvar_tiny: torch.nn.Module, tiny_vae: torch.nn.Module, s: int, other: int, seed: int
) -> None:
    model = mvar_tiny
    label = torch.tensor([seed % 10])
    _, x = _teacher_input(tiny_vae, 1, seed)
    g = torch.Generator().manual_seed(seed)
    first_l = model.first_l
    bg, ed = model.begin_ends[other]
    x2 = x.clone()
    if other == 0:  # scale 0's input is the class token: change the class instead
        label2 = torch.tensor([(seed + 1) % 10])
    else:
        label2 = label
        x2[:, bg - first_l : ed - first_l] += torch.randn(x2[:, bg - first_l : ed - first_l].shape, generator=g)
    with torch.no_grad():
        a, b = model(label, x), model(label2, x2)
    sb, se = model.begin_ends[s]
    diff_s = (a[:, sb:se] - b[:, sb:se]).abs().max().item()
    if other == s or other == 0:  # the class also conditions every block through AdaLN
        assert diff_s > 1e-4, "perturbing scale s's own input must change its logits"
    else:
        assert diff_s < 1e-5, f"scale {s} logits changed by {diff_s} when scale {other}'s input changed"


def test_var_and_mvar_share_the_teacher_forcing_signature(tiny_vae: torch.nn.Module) -> None:
    # VAR takes scales= like MVAR: the logits of those scales, as in the full forward.
    model = _tiny("var-tiny")
    label = torch.tensor([1, 2])
    _, x = _teacher_input(tiny_vae, 2)
    be = model.begin_ends
    with torch.no_grad():
        full = model(label, x)
        assert torch.equal(model(label, x, scales=range(10)), full)
        part = model(label, x, scales=[5, 3])  # prefix 0..5, rows of scales 3 and 5
    want = torch.cat([full[:, be[3][0] : be[3][1]], full[:, be[5][0] : be[5][1]]], 1)
    assert (part - want).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="subset of 0..9"):
        model(label, x, scales=[10])


def test_var_later_scales_do_see_earlier_ones(tiny_vae: torch.nn.Module) -> None:
    model = _tiny("var-tiny")
    _, x = _teacher_input(tiny_vae, 1)
    x2 = x.clone()
    x2[:, :4] += 1.0  # scale 1's input
    with torch.no_grad():
        a, b = model(torch.tensor([1]), x), model(torch.tensor([1]), x2)
    bg, ed = model.begin_ends[5]
    assert (a[:, bg:ed] - b[:, bg:ed]).abs().max() > 1e-4
    assert (a[:, :1] - b[:, :1]).abs().max() < 1e-6  # scale 0 cannot see scale 1


# --- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_paper_parameter_counts(depth: int) -> None:
    names = [f"var-d{depth}"] + ([f"mvar-d{depth}"] if depth != 30 else [])
    sds = []
    for name in names:
        model = build_model(name, device="meta", init=False)
        assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[depth], name
        sds.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
    if len(sds) == 2:
        assert list(sds[0].items()) == list(sds[1].items()), "VAR and MVAR state dicts differ"
    assert len(sds[0]) == 4 + 4 + 13 * depth + 4  # 220 keys for d16 (docs/mvar.md §4)


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(KeyError) as e:
        get_preset("mvar-d17")
    for name in ("var-d16", "mvar-d24", "mvar-tiny"):
        assert name in str(e.value)
    assert list_presets() == sorted(PRESETS)


def test_kernel_larger_than_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="larger than the 6x6 token map"):
        get_preset("mvar-tiny").replace(refine_step=5)


def test_masks_are_rebuilt_not_loaded() -> None:
    var, mvar = _tiny("var-tiny"), _tiny("mvar-tiny")
    assert torch.isfinite(var.attn_bias_for_masking).sum() == 286_434  # docs/counting.md §2
    assert torch.isfinite(mvar.attn_bias_for_masking).sum() == 110_468
    mvar.load_state_dict(var.state_dict())  # fine-tune start: VAR weights into MVAR
    assert torch.isfinite(mvar.attn_bias_for_masking).sum() == 110_468
    for (k, a), b in zip(var.state_dict().items(), mvar.state_dict().values()):
        if k != "attn_bias_for_masking":
            assert torch.equal(a, b), k


@pytest.mark.parametrize("arch", ["var", "mvar"])
def test_512px_geometry_runs(arch: str) -> None:
    model = _tiny(f"{arch}-tiny-512")
    vae = build_vqvae(model.config.vae).eval()
    assert model.L == 2240
    _, x = _teacher_input(vae, 1)
    with torch.no_grad():
        assert model(torch.tensor([1]), x).shape == (1, 2240, 512)
    out = model.sample(vae, torch.tensor([2]), guidance=1.5, top_k=10, g_seed=0, decode=False)
    assert [t.shape[1] for t in out.idx_Bl] == [pn * pn for pn in model.patch_nums]
    assert out.fhat.shape == (1, 32, 32, 32)


# --- sampling semantics ----------------------------------------------------------------------


def test_guidance_one_differs_between_the_official_samplers(tiny_vae: torch.nn.Module) -> None:
    label = torch.tensor([7])
    var, mvar = _tiny("var-tiny"), _tiny("mvar-tiny")
    assert var.sample(tiny_vae, label, guidance=1.0, g_seed=0, decode=False).guided
    assert not mvar.sample(tiny_vae, label, guidance=1.0, g_seed=0, decode=False).guided
    assert mvar.sample(tiny_vae, label, guidance=1.01, g_seed=0, decode=False).guided
    assert var.GUIDANCE_ONE_RUNS_UNCONDITIONAL and not mvar.GUIDANCE_ONE_RUNS_UNCONDITIONAL


def test_cfg_is_an_alias_of_guidance(tiny_vae: torch.nn.Module) -> None:
    # ``cfg=`` is the official samplers' keyword; it must mean exactly ``guidance=``.
    model = _tiny("var-tiny")
    a = model.sample(tiny_vae, torch.tensor([3]), guidance=2.0, top_k=20, g_seed=5, decode=False)
    b = model.sample(tiny_vae, torch.tensor([3]), cfg=2.0, top_k=20, g_seed=5, decode=False)
    c = model.sample(tiny_vae, torch.tensor([3]), cfg=1.0, top_k=20, g_seed=5, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.idx_Bl, b.idx_Bl))
    assert not all(torch.equal(x, y) for x, y in zip(a.idx_Bl, c.idx_Bl))
    with pytest.raises(ValueError, match="once"):
        model.sample(tiny_vae, torch.tensor([3]), guidance=2.0, cfg=2.0, g_seed=5, decode=False)


def test_top_k_keeps_ties_and_top_p_keeps_the_largest() -> None:
    logits = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 0.0]]])
    out = top_k_top_p_filter_(logits.clone(), top_k=2)
    assert torch.isfinite(out).tolist() == [[[True, False, True, True, False]]]  # tie at k-th kept
    out = top_k_top_p_filter_(torch.tensor([[[10.0, 0.0, 0.0]]]), top_p=0.01)
    assert torch.isfinite(out).tolist() == [[[True, False, False]]]
    same = torch.randn(1, 4, 9)
    assert torch.equal(top_k_top_p_filter_(same.clone(), 0, 0.0), same)  # 0 means off


def test_sampling_is_seeded(tiny_vae: torch.nn.Module) -> None:
    model = _tiny("mvar-tiny")
    a = model.sample(tiny_vae, torch.tensor([1, 2]), guidance=2.0, top_k=100, g_seed=3, decode=False)
    b = model.sample(tiny_vae, torch.tensor([1, 2]), guidance=2.0, top_k=100, g_seed=3, decode=False)
    c = model.sample(tiny_vae, torch.tensor([1, 2]), guidance=2.0, top_k=100, g_seed=4, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.idx_Bl, b.idx_Bl))
    assert not all(torch.equal(x, y) for x, y in zip(a.idx_Bl, c.idx_Bl))


def test_label_dropout_only_in_training(tiny_vae: torch.nn.Module) -> None:
    model = _tiny("var-tiny")
    _, x = _teacher_input(tiny_vae, 64)
    label = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(label, x), model(label, x))  # eval: no dropout
        model.train()
        model.blocks.apply(lambda m: setattr(m, "p", 0.0) if hasattr(m, "p") else None)
        torch.manual_seed(0)
        a = model(label, x)
    per_row = (a - a[:1]).abs().amax(dim=(1, 2))
    assert (per_row > 0).any(), "some of 64 labels should have been dropped to the null class"


# --- autocast: the neighbourhood scales take one dtype ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mvar_neighbourhood_scales_run_under_autocast(dtype: torch.dtype) -> None:
    """Under autocast the cosine-normalised q (fp32 temperature) and v (autocast dtype) differ
    in dtype; the NA scales cast them to the autocast dtype as SDPA does on the dense scales
    (before, na2d raised TypeError: the official fp16 sampling and training of MVAR crashed).
    Forward and a training step's backward, close to fp32."""
    from mvar.step import make_optimizer, train_step

    model = _tiny("mvar-tiny")
    x = torch.randn(2, model.L - model.first_l, model.Cvae, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(label, x, scales=[9])
        with torch.autocast("cpu", dtype=dtype):
            out = model(label, x, scales=[9])
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), f"autocast logits off by {err}"
    model.train()
    targets = torch.randint(model.V, (2, model.L))
    loss = train_step(model, make_optimizer(model, 1e-4), label, x, targets, [9], amp_dtype=dtype)
    assert torch.isfinite(loss)
