"""The attention analysis (``mvar.analysis``, ``repro.attention_analysis``).

Aggregates are checked on constructed probabilities of known mass (hand-computed values) and on
random probabilities against a brute-force oracle written here with exact rational coordinates;
the probe on random-init tiny VAR / MVAR: rows sum to 1, block-causal / block-diagonal
structure, MVAR keeps all of its own mass, outputs untouched, one map alive at a time.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mvar import analysis as an
from mvar.analysis import (
    AttentionAccumulator,
    AttentionProbe,
    PyramidGeometry,
    analyse,
    analysis_rows,
    distance_bins,
    from_accumulator,
    metric_name,
    natten_window_mask,
    parse_metric,
)

PN = (1, 2, 3, 4)  # a miniature pyramid: 30 tokens


# --------------------------------------------------------------------------------------------
# Oracle: exact rational geometry, written independently of the module
# --------------------------------------------------------------------------------------------


def centre(i: int, p_key: int, p_query: int) -> Fraction:
    return (Fraction(i) + Fraction(1, 2)) * Fraction(p_query, p_key) - Fraction(1, 2)


def oracle_bin(q: tuple[int, int], key: tuple[int, int], pq: int, pk: int) -> int:
    d = max(abs(centre(key[0], pk, pq) - q[0]), abs(centre(key[1], pk, pq) - q[1]))
    r = 0
    while d > r + Fraction(1, 2):
        r += 1
    return r


def oracle_in_window(q: tuple[int, int], key: tuple[int, int], pq: int, pk: int, k: int) -> bool:
    for qa, ka in zip(q, key):
        start = min(max(qa - k // 2, 0), pq - k)  # NATTEN: shifted inwards at the border
        c = centre(ka, pk, pq)
        if not (start - Fraction(1, 2) <= c <= start + k - Fraction(1, 2)):
            return False
    return True


def test_geometry_matches_the_oracle() -> None:
    for pq in (1, 2, 3, 4, 5, 8):
        for pk in {pq, max(pq - 1, 1), max(pq // 2, 1)}:
            bins = distance_bins(pq, pk)
            for qi in range(pq * pq):
                for ki in range(pk * pk):
                    q, key = divmod(qi, pq), divmod(ki, pk)
                    assert bins[qi, ki] == oracle_bin(q, key, pq, pk), (pq, pk, q, key)
            for k in range(1, pq + 1):
                m = natten_window_mask(pq, pk, k)
                want = [
                    [
                        oracle_in_window(divmod(qi, pq), divmod(ki, pk), pq, pk, k)
                        for ki in range(pk * pk)
                    ]
                    for qi in range(pq * pq)
                ]
                assert m.tolist() == want, (pq, pk, k)


def test_geometry_hand_values() -> None:
    # 2x2 keys on a 4x4 query grid: centres at 0.5 and 2.5.
    b = distance_bins(4, 2)
    assert b[0, 0] == 0 and b[0, 3] == 2 and b[15, 3] == 0 and b[15, 0] == 2
    # Own scale: the NATTEN window of every query holds exactly k*k keys; the corner query's
    # 7x7 window on 13x13 is rows/cols 0..6 (shifted, not cut).
    m = natten_window_mask(13, 13, 7)
    assert (m.sum(1) == 49).all()
    corner = m[0].view(13, 13)
    assert corner[:7, :7].all() and corner.sum() == 49
    # Own-scale bins are the plain Chebyshev distance.
    assert distance_bins(5, 5)[0].view(5, 5)[4, 2] == 4


# --------------------------------------------------------------------------------------------
# Constructed probabilities of known mass
# --------------------------------------------------------------------------------------------


def test_aggregates_exact_on_constructed_probabilities() -> None:
    """Every 4x4 query: 1/2 on itself, 1/4 on token (0,0) of the 3x3 scale, 1/4 on the 1x1."""
    g = PyramidGeometry(PN)
    acc = AttentionAccumulator(g, num_layers=1, num_heads=2)
    B, H, L = 2, 2, g.seq_len
    bg3, bg2 = g.begin_ends[3][0], g.begin_ends[2][0]
    P = torch.zeros(B, H, 16, L, dtype=torch.float64)
    for qi in range(16):
        P[:, :, qi, bg3 + qi] = 0.5
        P[:, :, qi, bg2] = 0.25
        P[:, :, qi, 0] = 0.25
    acc.add(0, 3, P, torch.arange(L))
    a = from_accumulator(acc, kernel_size=3, refine_step=3, num_images=B)
    np.testing.assert_array_equal(a.scale_mass()[3], [0.25, 0.0, 0.25, 0.5])
    np.testing.assert_array_equal(a.distance_mass(0)[3], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(a.window_mass(0, "natten")[3, :4], [1.0] * 4)
    # key (0,0) of the 3x3 scale sits at 1/6 on the 4x4 grid: axis bins 0, 1, 2, 3 for query
    # rows 0..3, so Chebyshev bin r holds (r+1)^2 - r^2 of the 16 queries.
    np.testing.assert_array_equal(a.distance_mass(1)[3], np.array([1, 3, 5, 7]) / 16)
    # NATTEN windows: k=1 only query (0,0); k=2,3: queries with rows and cols in {0,1}.
    np.testing.assert_array_equal(a.window_mass(1, "natten")[3, :4], [1 / 16, 4 / 16, 4 / 16, 1])
    np.testing.assert_array_equal(a.window_mass(1, "centred")[3, :4], np.cumsum([1, 3, 5, 7]) / 16)
    # MVAR's pattern with k=3 on scale 3: its own mass, all on the query itself.
    assert a.kept_mass_per_scale()[3] == 0.5
    # The summary: scale 3 only was added.
    assert an.summary_scale_mass(a) == {"own": 0.5, "previous": 0.25, "earlier": 0.25}


def _random_block_causal(
    g: PyramidGeometry,
    si: int,
    B: int,
    H: int,
    gen: torch.Generator,
) -> torch.Tensor:
    L_vis = g.begin_ends[si][1]
    lq = g.patch_nums[si] ** 2
    logits = torch.randn(B, H, lq, L_vis, generator=gen, dtype=torch.float64) * 3
    P = torch.zeros(B, H, lq, g.seq_len, dtype=torch.float64)
    P[..., :L_vis] = torch.softmax(logits, -1)
    return P


def test_aggregates_match_brute_force_on_random_probabilities() -> None:
    g = PyramidGeometry(PN)
    D, H, B = 2, 2, 3
    gen = torch.Generator().manual_seed(0)
    acc = AttentionAccumulator(g, D, H, tracked_queries=[(3, 1, 2)])
    Ps = {}
    for layer in range(D):
        for si in range(len(PN)):
            Ps[layer, si] = _random_block_causal(g, si, B, H, gen)
            acc.add(layer, si, Ps[layer, si], torch.arange(g.seq_len))
    a = from_accumulator(acc, kernel_size=3, refine_step=2, num_images=B)
    S, N = len(PN), max(PN)
    sm = np.zeros((S, S))
    dist = np.zeros((2, S, N))
    win = np.zeros((2, S, N))
    kept = np.zeros(S)
    be = g.begin_ends
    for (layer, si), P in Ps.items():
        pq = PN[si]
        Pn = P.numpy()
        for ks in range(S):
            sm[si, ks] += Pn[..., be[ks][0] : be[ks][1]].sum()
        for o in (0, 1):
            if si - o < 0:
                continue
            pk = PN[si - o]
            for qi in range(pq * pq):
                for ki in range(pk * pk):
                    m = Pn[:, :, qi, be[si - o][0] + ki].sum()
                    q, key = divmod(qi, pq), divmod(ki, pk)
                    dist[o, si, oracle_bin(q, key, pq, pk)] += m
                    for k in range(1, pq + 1):
                        win[o, si, k - 1] += m * oracle_in_window(q, key, pq, pk, k)
                    if o == 0 and (si < 2 or oracle_in_window(q, key, pq, pk, 3)):
                        kept[si] += m
    count = np.array([D * H * B * pn * pn for pn in PN], dtype=float)
    np.testing.assert_allclose(a.scale_mass(), sm / count[:, None], rtol=0, atol=1e-13)
    np.testing.assert_allclose(a.scale_mass().sum(1), 1.0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(a.kept_mass_per_scale(), kept / count, rtol=0, atol=1e-13)
    for o in (0, 1):
        for si, pn in enumerate(PN):
            if si - o < 0:
                assert np.isnan(a.distance_mass(o)[si]).all()
                continue
            denom = sm[si, si - o]
            np.testing.assert_allclose(
                a.distance_mass(o)[si, :pn], dist[o, si, :pn] / denom, rtol=0, atol=1e-12
            )
            np.testing.assert_allclose(
                a.window_mass(o, "natten")[si, :pn], win[o, si, :pn] / denom, rtol=0, atol=1e-12
            )
            # Monotone in k, 1 at the full window, for both rules.
            wn = a.window_mass(o, "natten")[si, :pn]
            wc = a.window_mass(o, "centred")[si, :pn]
            for w in (wn, wc):
                assert (np.diff(w) >= -1e-15).all()
                assert w[-1] == pytest.approx(1.0, abs=1e-13)
    # Per-layer views: layer 1 only.
    sm1 = np.zeros((S, S))
    for si in range(S):
        for ks in range(S):
            sm1[si, ks] = Ps[1, si].numpy()[..., be[ks][0] : be[ks][1]].sum() / (
                H * B * PN[si] ** 2
            )
    np.testing.assert_allclose(a.scale_mass(layer=1), sm1, rtol=0, atol=1e-13)
    # The tracked query's row: the mean over images, heads and layers.
    want = sum(Ps[lyr, 3][:, :, 1 * 4 + 2].sum((0, 1)) for lyr in range(D)) / (D * H * B)
    np.testing.assert_allclose(a.query_map(0), want.numpy(), rtol=0, atol=1e-14)


def test_metric_names_round_trip_and_rows_carry_the_arrays() -> None:
    name = metric_name("window_mass", layer="all", head=3, qs=9, offset="own", rule="natten", k=7)
    assert parse_metric(name) == (
        "window_mass",
        {"layer": "all", "head": "3", "qs": "9", "offset": "own", "rule": "natten", "k": "7"},
    )
    assert parse_metric("fid") == ("fid", {})
    g = PyramidGeometry(PN)
    acc = AttentionAccumulator(g, 1, 1)
    gen = torch.Generator().manual_seed(1)
    for si in range(len(PN)):
        acc.add(0, si, _random_block_causal(g, si, 1, 1, gen), torch.arange(g.seq_len))
    a = from_accumulator(acc, kernel_size=3, refine_step=3)
    from repro.report import COLUMNS, ResultRow, capture_environment

    rows = analysis_rows(a, capture_environment("cpu"))
    assert all(isinstance(r, ResultRow) for r in rows)
    assert tuple(ResultRow.__dataclass_fields__) == COLUMNS
    by = {r.metric: r.value for r in rows}
    assert (
        by[metric_name("scale_mass", layer="all", head="all", qs=3, ks=2)] == a.scale_mass()[3, 2]
    )
    key = metric_name(
        "window_mass", layer="0", head="all", qs=3, offset="previous", rule="natten", k="full"
    )
    assert by[key] == pytest.approx(1.0, abs=1e-13)
    assert by[metric_name("mvar_kept_mass", layer="all", head="all", qs="all")] == a.kept_mass()


# --------------------------------------------------------------------------------------------
# The probe on random-init tiny models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    from mvar.build import build_model

    torch.manual_seed(0)
    return {arch: build_model(f"{arch}-tiny").eval() for arch in ("var", "mvar")}


@pytest.fixture(scope="module")
def tokens(tiny_vae: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, tiny_vae.cfg.vocab_size, (2, pn * pn), generator=gen) for pn in tiny_vae.cfg.patch_nums]
    return idx, torch.tensor([3, 10])  # one class, one null-class image


@pytest.mark.parametrize("arch", ["var", "mvar"])
def test_probe_on_tiny_models(arch: str, tiny_models, tiny_vae, tokens) -> None:
    model = tiny_models[arch]
    idx, labels = tokens
    a = analyse(model, tiny_vae, idx, labels, batch_size=1)
    m = a.scale_mass()
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=0, atol=1e-12)
    for layer in range(a.num_layers):
        for head in range(a.num_heads):
            np.testing.assert_allclose(a.scale_mass(layer, head).sum(1), 1.0, atol=1e-12)
    if arch == "var":
        assert (np.triu(m, 1) == 0).all() and (m[np.tril_indices(10, -1)] > 0).all()  # block-causal
        assert a.kept_mass() < 0.99
    else:
        assert (m - np.diag(np.diag(m)) == 0).all()  # block-diagonal
        assert a.kept_mass() == pytest.approx(1.0, abs=1e-12)
        assert np.isnan(a.window_mass(1)).all()  # no previous-scale mass to share out
        assert a.info["na_backend"] is not None
    for o in (0,) if arch == "mvar" else (0, 1):
        w = a.window_mass(o, "natten")
        for si, pn in enumerate(a.patch_nums[o:], start=o):
            assert (np.diff(w[si, :pn]) >= -1e-12).all() and w[si, pn - 1] == pytest.approx(1.0)
    # One probability block at a time, none left when a layer starts; every call checked.
    assert a.info["peak_live_maps"] == 1 and a.info["live_maps_at_layer_start"] == 0
    assert a.info["max_output_error"] < 1e-4
    expected_calls = 2 * len(model.blocks) * (1 if arch == "var" else len(model.forward_groups(range(10))))
    assert a.info["attention_calls"] == expected_calls


@pytest.mark.parametrize("arch", ["var", "mvar"])
def test_hooks_do_not_change_logits(arch: str, tiny_models, tiny_vae, tokens) -> None:
    model = tiny_models[arch]
    idx, labels = tokens
    x = tiny_vae.idx_to_teacher_input(idx)
    g = PyramidGeometry(tuple(model.patch_nums))
    with torch.no_grad():
        plain = model(labels, x)
        acc = AttentionAccumulator(g, len(model.blocks), model.config.num_heads)
        with AttentionProbe(model, acc) as probe:
            parts = []
            runs = [list(range(10))] if arch == "var" else model.forward_groups(range(10))
            for chunk in runs:
                probe.query_tokens = torch.cat([torch.arange(*g.begin_ends[s]) for s in chunk])
                parts.append(model(labels, x) if arch == "var" else model(labels, x, scales=chunk))
            hooked = torch.cat(parts, dim=1)
        after = model(labels, x)
    assert probe.calls > 0 and acc.query_count.sum() > 0
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    # The hooks are gone after the context.
    assert not model.dense_attention._forward_hooks
    assert all(not b._forward_pre_hooks for b in model.blocks)


def test_live_map_counter_sees_retained_maps(tiny_models, tiny_vae, tokens, monkeypatch) -> None:
    """The counter behind the one-layer-at-a-time check is real: keep the maps and it shows."""
    kept: list[torch.Tensor] = []
    add = AttentionAccumulator.add

    def hoarding_add(self, layer, si, probs, keys):  # type: ignore[no-untyped-def]
        kept.append(probs)
        return add(self, layer, si, probs, keys)

    monkeypatch.setattr(AttentionAccumulator, "add", hoarding_add)
    idx, labels = tokens
    a = analyse(tiny_models["var"], tiny_vae, idx, labels)
    assert a.info["live_maps_at_layer_start"] >= 10 and a.info["peak_live_maps"] >= 20


def test_output_check_catches_a_wrong_window(tiny_models, tiny_vae, tokens, monkeypatch) -> None:
    """A probe that assumed centred windows cut at the border (not NATTEN's shifted ones) would
    analyse probabilities MVAR never used; the P·v = output check refuses."""

    def cut_window(pq: int, pk: int, k: int) -> torch.Tensor:
        return distance_bins(pq, pk) <= k // 2

    monkeypatch.setattr(an, "natten_window_mask", cut_window)
    idx, labels = tokens
    with pytest.raises(RuntimeError, match="do not reproduce the attention output"):
        analyse(tiny_models["mvar"], tiny_vae, idx, labels)


def test_analyse_rejects_bad_input(tiny_models, tiny_vae) -> None:
    model = tiny_models["var"]
    with pytest.raises(ValueError, match="one \\(B, pn²\\) tensor per scale"):
        analyse(model, tiny_vae, [torch.zeros(2, 1, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        analyse(model, tiny_vae, torch.full((1, 3, 32, 32), 2.0))


def test_npz_round_trip(tmp_path) -> None:
    g = PyramidGeometry(PN)
    acc = AttentionAccumulator(g, 1, 2, tracked_queries=[(3, 0, 0)])
    gen = torch.Generator().manual_seed(2)
    for si in range(len(PN)):
        acc.add(0, si, _random_block_causal(g, si, 1, 2, gen), torch.arange(g.seq_len))
    a = from_accumulator(acc)
    b = an.AttentionAnalysis.load_npz(a.save_npz(tmp_path / "x.npz"))
    assert b.patch_nums == a.patch_nums and b.tracked_queries == a.tracked_queries
    np.testing.assert_array_equal(b.scale_mass(), a.scale_mass())
    np.testing.assert_array_equal(b.natten_sum, a.natten_sum)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def test_cli_bad_input_is_one_line(tmp_path, capsys) -> None:
    from repro import attention_analysis as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--images", str(tmp_path / "missing.npz"), "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.npz" in err[0]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(SystemExit):
        cli.main(["--images", str(bad), "--out", str(tmp_path)])
    assert "expected uint8 images (N, 32, 32, 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end(tmp_path) -> None:
    from repro import attention_analysis as cli
    from repro.report import read_csv

    imgs = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=imgs, labels=np.array([1, 2]))
    made = cli.main(
        ["--images", str(tmp_path / "imgs.npz"), "--batch-size", "2", "--out", str(tmp_path)]
    )
    out = tmp_path / "attention"
    for f in (
        "attention.csv",
        "attention.md",
        "var-tiny.npz",
        "var-tiny.json",
        "figures/var-tiny_scale_mass.png",
        "figures/var-tiny_window_mass.png",
        "figures/var-tiny_query_maps.png",
    ):
        assert (out / f) in made and (out / f).stat().st_size > 0, f
    df = read_csv(out / "attention.csv")
    assert set(df.table) == {"attention-analysis"} and (df.status == "ok").all()
    own = df[df.metric == metric_name("scale_mass", layer="all", head="all", qs="all", ks="own")]
    assert len(own) == 1 and 0 < float(own.value.iloc[0]) < 1
    assert "random init" in (out / "attention.md").read_text()
    # A second model's rows join the first's; redrawing from the npz needs no model.
    cli.main(
        [
            "--images",
            str(tmp_path / "imgs.npz"),
            "--name",
            "var-tiny-b",
            "--out",
            str(tmp_path),
            "--num-images",
            "1",
        ]
    )
    assert set(read_csv(out / "attention.csv").model) == {"var-tiny", "var-tiny-b"}
    cli.main(["--from-npz", str(out / "var-tiny.npz"), "--out", str(tmp_path)])
    assert set(read_csv(out / "attention.csv").model) == {"var-tiny", "var-tiny-b"}
    assert math.isfinite(float(own.value.iloc[0]))
