"""The embedded study's parts: the content-keyed cache, the domain evaluator (and its
torch-fidelity registration), the FID bootstrap interval, and the whole pipeline at miniature
size (``repro.embedded``, study ``miniature``)."""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mvar import evaluator as ev
from mvar.cache import MANIFEST, ArtifactCache, code_fingerprint
from mvar.metrics import bootstrap_fid, feature_statistics, frechet_distance

# --- the cache ---------------------------------------------------------------------------------


def test_cache_reuses_identical_and_rebuilds_on_any_change(tmp_path: Path) -> None:
    builds: list[str] = []

    def build(tag: str):
        def run(folder: Path) -> dict:
            builds.append(tag)
            (folder / "out.txt").write_text(tag)
            return {"tag": tag}

        return run

    cache = ArtifactCache(tmp_path, code="code-A")
    a = cache.get_or_build("stage", {"steps": 10}, {"vae": "sha-1"}, build("a"))
    assert not a.reused and builds == ["a"] and (a.path / MANIFEST).is_file()
    again = cache.get_or_build("stage", {"steps": 10}, {"vae": "sha-1"}, build("again"))
    assert again.reused and again.path == a.path and builds == ["a"]
    assert again.info == {"tag": "a"}
    # A changed config, a changed input hash and changed code each build anew.
    changed = [
        cache.get_or_build("stage", {"steps": 11}, {"vae": "sha-1"}, build("cfg")),
        cache.get_or_build("stage", {"steps": 10}, {"vae": "sha-2"}, build("input")),
        ArtifactCache(tmp_path, code="code-B").get_or_build(
            "stage", {"steps": 10}, {"vae": "sha-1"}, build("code")
        ),
    ]
    assert builds == ["a", "cfg", "input", "code"]
    assert len({c.path for c in changed} | {a.path}) == 4


def test_cache_resumes_in_an_incomplete_folder_and_refuses_a_foreign_manifest(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, code="c")
    key = cache.key("train", {"n": 1}, {})
    folder = cache.folder("train", key)
    folder.mkdir(parents=True)
    (folder / "last.pth").write_text("partial")  # a killed build left work behind

    def build(f: Path) -> dict:
        return {"saw_partial": (f / "last.pth").read_text() == "partial"}

    art = cache.get_or_build("train", {"n": 1}, {}, build)
    assert art.info["saw_partial"] and art.manifest["resumed"]
    m = json.loads((folder / MANIFEST).read_text())
    m["key"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RuntimeError, match="another key"):
        cache.get_or_build("train", {"n": 1}, {}, build)


def test_code_fingerprint_changes_with_an_extra_file(tmp_path: Path) -> None:
    f = tmp_path / "stage.py"
    f.write_text("x = 1\n")
    a = code_fingerprint(extra=[f])
    f.write_text("x = 2\n")
    assert code_fingerprint(extra=[f]) != a
    assert code_fingerprint() == code_fingerprint()


# --- FID bootstrap --------------------------------------------------------------------------------


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    d = 8
    ref = rng.normal(size=(4000, d))
    mu, sigma = feature_statistics(ref)
    widths = []
    for n in (200, 3200):
        x = rng.normal(loc=0.3, size=(n, d))
        fid, lo, hi = bootstrap_fid(x, mu, sigma, reps=100, seed=1)
        assert fid == pytest.approx(frechet_distance(*feature_statistics(x), mu, sigma))
        assert lo <= fid <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n)
    with pytest.raises(ValueError, match="reps"):
        bootstrap_fid(ref, mu, sigma, reps=1)


# --- the evaluator ----------------------------------------------------------------------------------


def _tiny_evaluator() -> ev.ShapesClassifier:
    torch.manual_seed(0)
    return ev.ShapesClassifier(ev.EvaluatorConfig(num_classes=3, image_size=16, widths=(4, 8),
                                                  feature_dim=6)).eval()  # fmt: skip


def test_evaluator_file_round_trip_and_refuses_code(tmp_path: Path) -> None:
    model = _tiny_evaluator()
    path = ev.save_evaluator(model, tmp_path / "evaluator.pth")
    back = ev.load_evaluator(path)
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(back(x), model(x))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"config": {}, "state_dict": {"x": Evil()}}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="could run code"):
        ev.load_evaluator(evil)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="evaluator weights"):
        ev.load_evaluator(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_evaluator_learns_the_shapes_quickly() -> None:
    from torch.utils.data import Subset

    from mvar.data import SyntheticShapes

    data = SyntheticShapes(2, 300, 16, 0, radius=(0.5, 0.8))  # disc vs square, one colour
    x, y = ev.dataset_uint8(Subset(data, range(0, 500)))
    xt, yt = ev.dataset_uint8(Subset(data, range(500, 600)))
    cfg = ev.EvaluatorConfig(num_classes=2, image_size=16, widths=(8, 16), steps=120, batch_size=32)
    model = ev.train_evaluator(cfg, x, y)
    assert ev.accuracy(model, xt, yt) >= 0.9
    # Deterministic: the same seed gives the same weights.
    again = ev.train_evaluator(cfg, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))  # fmt: skip


def test_torch_fidelity_runs_on_the_registered_evaluator(tmp_path: Path) -> None:
    """The registered extractor gives torch-fidelity the same features as our extraction, so its
    FID equals ours computed from those features."""
    torch_fidelity = pytest.importorskip("torch_fidelity")
    model = _tiny_evaluator()
    path = ev.save_evaluator(model, tmp_path / "evaluator.pth")
    name = ev.register_with_torch_fidelity()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 200, (40, 3, 16, 16), dtype=torch.uint8, generator=g)

    class DS(torch.utils.data.Dataset):
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

        def __len__(self) -> int:
            return len(self.t)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.t[i]

    res = torch_fidelity.calculate_metrics(
        input1=DS(a), input2=DS(b), fid=True, feature_extractor=name,
        feature_extractor_weights_path=str(path), cuda=False, verbose=False, batch_size=16,
        save_cpu_ram=True,
    )  # fmt: skip
    fa = ev.extract(model, [a]).features
    fb = ev.extract(model, [b]).features
    ours = frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    assert res["frechet_inception_distance"] == pytest.approx(ours, rel=1e-3, abs=1e-5)


# --- the study at miniature size ---------------------------------------------------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_miniature_study_end_to_end_and_reuse(tmp_path: Path) -> None:
    from repro import embedded
    from repro.embedded_report import write_report

    study = embedded.get_study("miniature")
    cache, out = tmp_path / "cache", tmp_path / "report"
    first = embedded.run_study(study, cache, torch.device("cpu"))
    write_report(first, out)

    t1 = _rows(out / "table1.csv")
    models = [*embedded.MODELS, *embedded.SANITY]
    for m in models:
        got = {r["metric"]: r for r in t1 if r["model"] == m}
        assert set(got) == {"fid", "fid_ci_low", "fid_ci_high", "is", "precision", "recall",
                            "class_accuracy"}, m  # fmt: skip
        assert all(r["table"] == "table1-embedded" and r["status"] == "ok" for r in got.values())
        fid, lo, hi = (float(got[k]["value"]) for k in ("fid", "fid_ci_low", "fid_ci_high"))
        assert lo <= fid <= hi, m
        feats = np.load(out / "features" / f"{m}.npy")
        assert feats.dtype == np.float32 and feats.shape[1] == study.evaluator.feature_dim
    assert [r for r in t1 if r["model"] == "evaluator"][0]["metric"] == "heldout_accuracy"
    ref = np.load(out / "features" / "reference.npy")
    # The FID rows can be recomputed from the shipped features.
    var = np.load(out / "features" / "var-tiny.npy").astype(np.float64)
    fid_var = [float(r["value"]) for r in t1 if r["model"] == "var-tiny" and r["metric"] == "fid"][0]
    recomputed = frechet_distance(*feature_statistics(var), *feature_statistics(ref.astype(np.float64)))
    assert recomputed == pytest.approx(fid_var, rel=1e-3)

    t2 = _rows(out / "table2.csv")
    for m in ("var-tiny", "mvar-tiny"):
        got = {r["metric"]: r for r in t2 if r["model"] == m}
        assert {"generation_peak_memory", "kv_cache", "sampling_latency", "train_step_time",
                "train_peak_memory", "attention_gflops", "full_gflops_per_image",
                "vae_decode_gflops_per_image"} <= set(got)  # fmt: skip
        assert got["generation_peak_memory"]["method"] == "measured"
        assert float(got["generation_peak_memory"]["value"]) > 0
        # The whole transformer costs more than its attention blocks (docs/counting.md §4).
        assert float(got["full_gflops_per_image"]["value"]) > float(got["attention_gflops"]["value"])
    kv = {r["model"]: float(r["value"]) for r in t2 if r["metric"] == "kv_cache"}
    assert kv["var-tiny"] > 0 and kv["mvar-tiny"] == 0
    md = (out / "README.md").read_text()
    assert "## Reading" in md and "figures/progression.png" in md
    for fig in ("fid.png", "loss_curves.png", "progression.png", "samples_var-tiny.png"):
        assert (out / "figures" / fig).is_file()
    hist = _rows(first.artifacts["mvar-tiny"].path / "history.csv")
    assert hist and "scales" in hist[0]

    # An identical re-run reuses every trained artifact and gives the same numbers.
    second = embedded.run_study(study, cache, torch.device("cpu"))
    assert all(a.reused for a in second.artifacts.values())
    assert {k: v.fid for k, v in second.scores.items()} == {k: v.fid for k, v in first.scores.items()}

    # Sampling in bf16 (issue 13): the trained artifacts are reused, the samples are not (the
    # precision is in their key), and the rows say which precision made them.
    bf16 = embedded.run_study(dataclasses.replace(study, dtype="bf16"), cache, torch.device("cpu"))
    for key, art in bf16.artifacts.items():
        assert art.reused == (not key.startswith("samples-")), key
    write_report(bf16, tmp_path / "report-bf16")
    t1b = _rows(tmp_path / "report-bf16" / "table1.csv")
    dt = {r["model"]: r["dtype"] for r in t1b}
    assert dt["var-tiny"] == dt["mvar-tiny"] == "float32+autocast(bfloat16)"
    assert dt["real-holdout"] == dt["evaluator"] == "float32"
    t2b = {(r["model"], r["metric"]): r["dtype"] for r in _rows(tmp_path / "report-bf16" / "table2.csv")}
    assert t2b[("mvar-tiny", "sampling_latency")] == "float32+autocast(bfloat16)"
    assert t2b[("mvar-tiny", "train_step_time")] == "float32"


@pytest.mark.slow
def test_metric_sanity_ordering_at_miniature_size(tmp_path: Path) -> None:
    """In the evaluator's feature space, FID orders the three sanity sets as the study claims:
    real vs real (floor) < the tokenizer's reconstructions < a blurred and noised set. A 16 px
    micro tokenizer and a small evaluator, trained here in seconds, with the study's own
    reconstruct / degrade / extract code."""
    from torch.utils.data import Subset

    from mvar.checkpoint import load_vqvae
    from mvar.config import get_vae_preset
    from mvar.data import SyntheticShapes
    from mvar.train_vae import VAETrainConfig, train_vae
    from repro.embedded import degrade, reconstruct

    data = SyntheticShapes(4, 600, 16, 0, texture=True, radius=(0.5, 0.8))
    split = {"vae": range(0, 800), "eval": range(800, 1600), "ref": range(1600, 2000),
             "hold": range(2000, 2400)}  # fmt: skip
    vcfg = VAETrainConfig(vae="vae-micro", out_dir=str(tmp_path / "vae"), steps=400, batch_size=8,
                          lr=3e-3, warmup_steps=10, device="cpu", log_every=100, ckpt_every=400)  # fmt: skip
    vae = load_vqvae(train_vae(vcfg, data=Subset(data, split["vae"])), get_vae_preset("vae-micro"))
    x, y = ev.dataset_uint8(Subset(data, split["eval"]))
    clf = ev.train_evaluator(ev.EvaluatorConfig(num_classes=4, image_size=16, widths=(8, 16, 32),
                                                steps=200, batch_size=32), x, y)  # fmt: skip
    ref, _ = ev.dataset_uint8(Subset(data, split["ref"]))
    hold, _ = ev.dataset_uint8(Subset(data, split["hold"]))
    mu, sigma = feature_statistics(ev.extract(clf, [ref]).features)

    def fid(imgs: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(ev.extract(clf, [imgs]).features), mu, sigma)

    floor, recon, bad = fid(hold), fid(reconstruct(vae, hold)), fid(degrade(hold))
    assert floor < recon < bad, (floor, recon, bad)
