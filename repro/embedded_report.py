"""Files of the embedded study (:mod:`repro.embedded`): long-format CSVs, evaluator features,
figures and ``README.md`` with the tables and a plain-words reading of whatever the numbers are.

Kept apart from the study's stages so that rewording the report never invalidates the trained
artifacts (the cache key hashes :mod:`repro.embedded`, not this module).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mvar.io import atomic_path, atomic_write
from mvar.precision import describe
from repro.report import ResultRow, capture_environment, make_row, write_csv

if TYPE_CHECKING:
    from repro.embedded import StudyResult

log = logging.getLogger(__name__)

TABLE1_METRICS = ("fid", "fid_ci_low", "fid_ci_high", "is", "precision", "recall",
                  "class_accuracy")  # fmt: skip
TABLE2_METRICS: dict[str, tuple[str, str]] = {  # metric -> (unit, method)
    "generation_peak_memory": ("bytes", "measured"),
    "kv_cache": ("bytes", "counted"),
    "sampling_latency": ("s per batch", "measured"),
    "train_step_time": ("s per iteration", "measured"),
    "train_peak_memory": ("bytes", "measured"),
    "attention_gflops": ("GFLOPs per image", "counted"),
    # Not the paper's column: the whole transformer, both CFG halves (docs/counting.md §4).
    "full_gflops_per_image": ("GFLOPs (1 MAC = 1 FLOP) per image", "counted"),
    "vae_decode_gflops_per_image": ("GFLOPs (1 MAC = 1 FLOP) per image", "counted"),
}
LABELS = {
    "var-tiny": "VAR-tiny", "mvar-tiny": "MVAR-tiny", "mvar-tiny-finetune": "MVAR†-tiny",
    "mvar-tiny-scale-markov": "scale-Markov only", "real-holdout": "real vs real (floor)",
    "vqvae-reconstruction": "tokenizer reconstructions", "degraded": "degraded (blur+noise)",
}  # fmt: skip


def table1_rows(r: StudyResult) -> list[ResultRow]:
    from repro.embedded import SANITY, TABLE1

    # Scores are of samples made in the study's sampling precision; the evaluator is fp32.
    env = capture_environment(r.device, describe(r.study.dtype))
    env_fp32 = capture_environment(r.device, "float32")
    rows = []
    for name, sc in r.scores.items():
        values = {"fid": sc.fid, "fid_ci_low": sc.fid_low, "fid_ci_high": sc.fid_high,
                  "is": sc.inception_score, "precision": sc.precision, "recall": sc.recall,
                  "class_accuracy": sc.class_accuracy}  # fmt: skip
        for metric in TABLE1_METRICS:
            unit = "fraction" if metric in ("precision", "recall", "class_accuracy") else ""
            e = env_fp32 if name in SANITY else env  # sanity sets are not sampled: fp32
            rows.append(make_row(e, TABLE1, name, metric, values[metric], method="measured",
                                 unit=unit, batch=sc.images, paper_value=None,
                                 backend=r.backends.get(name, "")))  # fmt: skip
    rows.append(make_row(env_fp32, TABLE1, "evaluator", "heldout_accuracy", r.evaluator_accuracy,
                         method="measured", unit="fraction",
                         batch=int(r.artifacts["evaluator"].info["heldout_images"])))  # fmt: skip
    return rows


def table2_rows(r: StudyResult) -> list[ResultRow]:
    from repro.embedded import TABLE2

    # Sampling rows run in the study's precision; training steps are always fp32.
    env_sample = capture_environment(r.device, describe(r.study.dtype))
    env_train = capture_environment(r.device, "float32")
    rows = []
    for name, c in r.compute.items():
        for metric, (unit, method) in TABLE2_METRICS.items():
            env = env_train if metric.startswith("train") else env_sample
            batch = r.study.batch_size if metric.startswith("train") else (
                1 if "gflops" in metric else r.study.latency_batch)  # fmt: skip
            rows.append(make_row(env, TABLE2, name, metric, float(c[metric]), method=method,
                                 unit=unit, batch=batch, paper_value=None,
                                 backend=c["na_backend"]))  # fmt: skip
    return rows


def tokenizer_rows(r: StudyResult) -> list[ResultRow]:
    env = capture_environment(r.device, "float32")
    rows, rep = [], r.vae_report
    n = int(rep["num_images"])
    rows.append(make_row(env, "tokenizer-embedded", "vqvae", "psnr", rep["psnr"], method="measured",
                         unit="dB", batch=n, paper_value=None))  # fmt: skip
    for si, u in enumerate(rep["usage_per_scale"]):
        rows.append(make_row(env, "tokenizer-embedded", "vqvae", f"codebook_usage_scale{si}", u,
                             method="measured", unit="fraction", batch=n, paper_value=None))  # fmt: skip
    rows.append(make_row(env, "tokenizer-embedded", "vqvae", "reconstruction_fid",
                         r.scores["vqvae-reconstruction"].fid, method="measured", unit="",
                         batch=n, paper_value=None))  # fmt: skip
    return rows


def save_features(r: StudyResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, f in r.features.items():
        with atomic_path(folder / f"{name}.npy") as tmp, tmp.open("wb") as fh:
            np.save(fh, f.features.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _grid_png(img01_B3HW: torch.Tensor, nrow: int, path: Path, scale: int = 3) -> Path:
    from mvar.visualize import save_png, to_uint8_grid

    up = torch.nn.functional.interpolate(img01_B3HW, scale_factor=scale, mode="nearest")
    return save_png(to_uint8_grid(up, nrow=nrow), path)


def sample_grids(r: StudyResult, figs: Path, per_class: int = 8) -> dict[str, Path]:
    from repro.embedded import MODELS

    out = {}
    k = min(per_class, r.study.per_class)
    for name in MODELS:
        x = r.images[name].float() / 255
        rows = [x[c * r.study.per_class : c * r.study.per_class + k] for c in range(r.study.num_classes)]
        out[name] = _grid_png(torch.cat(rows), k, figs / f"samples_{name}.png")
    real = r.images["real-holdout"]
    order = torch.cat([torch.nonzero(torch.arange(len(real)) % r.study.num_classes == c)[:k, 0]
                       for c in range(r.study.num_classes)])  # fmt: skip
    out["real"] = _grid_png(real[order].float() / 255, k, figs / "samples_real.png")
    return out


@torch.no_grad()
def progression_figure(r: StudyResult, figs: Path) -> Path:
    """Per-scale progression of one sample per class, VAR-tiny and MVAR-tiny (rows), the
    image decoded after each of the ten scales (columns)."""
    from mvar.visualize import progression
    from repro.embedded import load_model, load_vae

    vae = load_vae(r.artifacts["vae"], r.device)
    s = r.study.sampling()
    strips = []
    for name in ("var-tiny", "mvar-tiny"):
        model = load_model(name, r.artifacts[name], r.device)
        labels = torch.arange(min(4, r.study.num_classes))
        out = model.sample(vae, labels, guidance=s.guidance, top_k=s.top_k, top_p=s.top_p, g_seed=r.study.seed)
        frames = progression(vae, out.idx_Bl)  # (S, B, 3, H, W)
        strips.append(frames.permute(1, 0, 2, 3, 4).reshape(-1, *frames.shape[2:]))
    return _grid_png(torch.cat(strips), len(vae.cfg.patch_nums), figs / "progression.png")


def loss_curves(r: StudyResult, figs: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repro.embedded import MODELS, history_rows
    from repro.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name in MODELS:
        hist = history_rows(r.artifacts[name].path)
        steps = np.array([int(h["step"]) for h in hist])
        loss = np.array([float(h["loss"]) for h in hist])
        w = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        axes[0].plot(steps[w - 1 :], smooth, label=LABELS[name])
    axes[0].set(xlabel="iteration", ylabel="token loss (per-token weight 1/L, running mean)",
                title="transformers (MVAR: loss of the chunk trained)")  # fmt: skip
    axes[0].legend(fontsize=8)
    vh = history_rows(r.artifacts["vae"].path)
    axes[1].plot([int(h["step"]) for h in vh], [float(h["loss"]) for h in vh])
    axes[1].set(xlabel="iteration", ylabel="loss", title="tokenizer", yscale="log")
    fig.tight_layout()
    return save_figure(fig, figs / "loss_curves.png")


def fid_figure(r: StudyResult, figs: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repro.report import save_figure

    names = list(r.scores)
    fid = np.array([r.scores[n].fid for n in names])
    err = np.array([[r.scores[n].fid - r.scores[n].fid_low for n in names],
                    [r.scores[n].fid_high - r.scores[n].fid for n in names]])  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colours = ["C0" if n in ("var-tiny",) else "C1" if n.startswith("mvar") else "0.6" for n in names]
    ax.bar(range(len(names)), fid, yerr=np.clip(err, 0, None), color=colours, capsize=4)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="FID (evaluator features), 95% bootstrap CI", yscale="log")
    fig.tight_layout()
    return save_figure(fig, figs / "fid.png")


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _overlap(a: Any, b: Any) -> bool:
    return not (a.fid_high < b.fid_low or b.fid_high < a.fid_low)


def reading(r: StudyResult) -> list[str]:
    """The plain-words reading, computed from the numbers (whatever they are)."""
    sc, c = r.scores, r.compute
    v = sc["var-tiny"]
    out = []
    floor, recon, bad = sc["real-holdout"].fid, sc["vqvae-reconstruction"].fid, sc["degraded"].fid
    ordered = floor < recon < bad
    out.append(
        f"- **The metric.** Evaluator held-out accuracy {r.evaluator_accuracy:.1%}. FID real vs "
        f"real {floor:.3g} < tokenizer reconstructions {recon:.3g} < degraded {bad:.3g}: the "
        + ("ordering holds, so FID in this space separates quality levels."
           if ordered else "**the expected ordering does NOT hold**; read the model rows with care.")
    )  # fmt: skip
    for name in ("mvar-tiny", "mvar-tiny-finetune", "mvar-tiny-scale-markov"):
        m = sc[name]
        inside = v.fid_low <= m.fid <= v.fid_high
        if _overlap(m, v):
            verdict = "the intervals overlap: no difference is resolved at this sample size"
        elif m.fid_high < v.fid_low:
            verdict = "its whole interval lies below VAR's: better than VAR-tiny here"
        else:
            verdict = "its whole interval lies above VAR's: worse than VAR-tiny here"
        out.append(
            f"- **{LABELS[name]} vs VAR-tiny.** FID {m.fid:.3g} [{m.fid_low:.3g}, {m.fid_high:.3g}] "
            f"against {v.fid:.3g} [{v.fid_low:.3g}, {v.fid_high:.3g}]; its FID lies "
            f"{'inside' if inside else 'outside'} VAR's 95% interval and {verdict}. Class "
            f"accuracy of samples {m.class_accuracy:.1%} vs {v.class_accuracy:.1%} (chance "
            f"{1 / r.study.num_classes:.0%})."
        )
    real_acc = sc["real-holdout"].class_accuracy
    best = max(sc[n].class_accuracy for n in ("var-tiny", "mvar-tiny", "mvar-tiny-finetune",
                                              "mvar-tiny-scale-markov"))  # fmt: skip
    if best < 0.5 * real_acc:
        out.append(
            f"- **Budget.** At this budget every model is far from converged: at most {best:.1%} "
            f"of samples are classified as their class, against {real_acc:.1%} of real images. "
            "The comparison is between equally undertrained models; `--study long` spends "
            "more iterations and samples on the same code."
        )
    if "var-tiny" in c and "mvar-tiny" in c:
        cv, cm = c["var-tiny"], c["mvar-tiny"]
        out.append(
            f"- **Compute.** Token-generation peak memory MVAR/VAR = "
            f"{cm['generation_peak_memory'] / cv['generation_peak_memory']:.2f}x "
            f"({cm['generation_peak_memory'] / 2**20:.1f} vs {cv['generation_peak_memory'] / 2**20:.1f} MiB "
            f"at batch {r.study.latency_batch}, weights included); KV cache "
            f"{cm['kv_cache'] / 2**20:.1f} vs {cv['kv_cache'] / 2**20:.1f} MiB; sampling latency "
            f"{cm['sampling_latency'] / cv['sampling_latency']:.2f}x; training iteration time "
            f"{cm['train_step_time'] / cv['train_step_time']:.2f}x (each under its own schedule); "
            f"training peak memory {cm['train_peak_memory'] / cv['train_peak_memory']:.2f}x; "
            f"attention GFLOPs {cm['attention_gflops'] / cv['attention_gflops']:.2f}x; full-model "
            f"GFLOPs per image {cm['full_gflops_per_image'] / cv['full_gflops_per_image']:.2f}x."
        )
    return out


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def write_report(r: StudyResult, out: Path) -> Path:
    from repro.embedded import MODELS, SANITY

    out.mkdir(parents=True, exist_ok=True)
    figs = out / "figures"
    write_csv(table1_rows(r), out / "table1.csv")
    write_csv(table2_rows(r), out / "table2.csv")
    write_csv(tokenizer_rows(r), out / "tokenizer.csv")
    save_features(r, out / "features")
    grids = sample_grids(r, figs)
    prog = progression_figure(r, figs)
    curves = loss_curves(r, figs)
    fidfig = fid_figure(r, figs)
    s = r.study
    lines = [
        "# Embedded study: VAR vs MVAR at toy scale, on a CPU",
        "",
        f"Study `{s.name}`; wall time {r.wall_seconds:.0f} s on {capture_environment(r.device).device} "
        f"(trained artifacts reused from the cache where their key matched: "
        f"{', '.join(k for k, a in r.artifacts.items() if a.reused) or 'none'}).",
        "Produced by `python -m repro.embedded` (`nox -s repro_table1`); every number below is "
        "measured or counted in that run (table1.csv, table2.csv, tokenizer.csv).",
        f"Sampling precision: {s.dtype} ({describe(s.dtype)}; training, the tokenizer "
        "and the sanity rows are fp32; docs/precision.md).",
        "",
        "## Reading",
        "",
        *reading(r),
        "",
        "## Table 1 at toy scale",
        "",
        f"{s.per_class} samples per class x {s.num_classes} classes per model, one setting for all: "
        f"guidance {s.guidance}, top-k {s.top_k} (off), top-p {s.top_p}, seed {s.seed}. FID, "
        f"precision/recall (k = {s.pr_k}) against {dict(s.split_sizes)['reference']} held-out real "
        f"images in the evaluator's {s.evaluator.feature_dim}-d feature space; 95% interval: "
        f"percentile bootstrap over the sample set ({s.bootstrap_reps} resamples); IS over "
        f"{s.is_splits} splits of the evaluator's softmax (max {s.num_classes}).",
        "",
        "| model | FID | 95% CI | IS | precision | recall | class accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*MODELS, *SANITY):
        sc = r.scores[name]
        lines.append(f"| {LABELS[name]} (`{name}`) | {_fmt(sc.fid)} | [{_fmt(sc.fid_low)}, "
                     f"{_fmt(sc.fid_high)}] | {_fmt(sc.inception_score)} | {_fmt(sc.precision)} | "
                     f"{_fmt(sc.recall)} | {_fmt(sc.class_accuracy)} |")  # fmt: skip
    lines += [
        "",
        f"![FID with 95% intervals](figures/{fidfig.name})",
        "",
        "## Table 2 at toy scale (measured on this machine, one run)",
        "",
        "| model | gen. peak memory (MiB) | KV cache (MiB) | latency (s/batch) | train iter (s) | "
        "train peak (MiB) | attention GFLOPs/image | full-model GFLOPs/image | "
        "VQ-VAE GFLOPs/image | NA backend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in r.compute.items():
        lines.append(f"| `{name}` | {c['generation_peak_memory'] / 2**20:.2f} | "
                     f"{c['kv_cache'] / 2**20:.2f} | {c['sampling_latency']:.3f} | "
                     f"{c['train_step_time']:.3f} | {c['train_peak_memory'] / 2**20:.2f} | "
                     f"{c['attention_gflops']:.4f} | {c['full_gflops_per_image']:.4f} | "
                     f"{c['vae_decode_gflops_per_image']:.4f} | {c['na_backend']} |")  # fmt: skip
    lines += [
        "",
        f"Memory: peak of live tensor bytes (weights of the transformer and VQ-VAE included) of "
        f"the real run, every storage followed through torch's dispatcher "
        f"(`mvar.profiling.LiveBytesTracker`, exact bytes, CPU): token generation at batch "
        f"{s.latency_batch} with guidance (2x rows), the training step at batch {s.batch_size} "
        "with AdamW state, max over the model's schedule chunks. Latency: median of "
        f"{s.latency_repeats} timed runs after one warm-up, tokens and decode, batch "
        f"{s.latency_batch}. Training iteration time: from the actual training run, the median "
        "wall time of each chunk's iterations (the first 10 iterations left out) weighted by the "
        "chunk's share of the model's schedule (VAR: every iteration all scales; MVAR and the "
        "ablation: 8 x scales 0-7, then 8, then 9). Attention GFLOPs: MACs of the qkv "
        "projection, QK^T and AV counted by hooks during sampling of one image (the paper's "
        "convention, docs/counting.md §1). Full-model GFLOPs: every matmul, linear layer and "
        "convolution the sampler dispatches for one image, both CFG halves, attention cores by "
        "their allowed pairs, 1 MAC = 1 FLOP (docs/counting.md §4); VQ-VAE: its quantizer's "
        "convolutions while sampling and the decoder. One machine, one run: compare ratios, "
        "not absolutes.",
        "",
        "## Tokenizer",
        "",
        f"PSNR {r.vae_report['psnr']:.2f} dB on the held-out images; codebook usage per scale "
        f"(distinct codes used / min(V, tokens)): "
        + ", ".join(f"{u:.2f}" for u in r.vae_report["usage_per_scale"])
        + f"; reconstruction FID {r.scores['vqvae-reconstruction'].fid:.3g}. Trained with "
        "pixel reconstruction + commitment losses only: the paper-scale recipe's perceptual "
        "(LPIPS) and adversarial losses need pretrained weights we cannot download.",
        "",
        "## Samples",
        "",
        "One row per class (5 shapes x 2 colours, striped), first images of each class.",
        "",
        "| real (held out) | VAR-tiny | MVAR-tiny | MVAR†-tiny | scale-Markov only |",
        "|---|---|---|---|---|",
        "| " + " | ".join(f"![{k}](figures/{grids[k].name})" for k in
                          ("real", "var-tiny", "mvar-tiny", "mvar-tiny-finetune",
                           "mvar-tiny-scale-markov")) + " |",  # fmt: skip
        "",
        f"Per-scale progression (VAR-tiny rows first, then MVAR-tiny; columns: after scales 1..10): "
        f"![progression](figures/{prog.name})",
        "",
        f"![loss curves](figures/{curves.name})",
        "",
        "## Setup",
        "",
        f"- Data: `SyntheticShapes` (texture {s.texture}, radius {s.radius}, seed {s.data_seed}), "
        f"splits {dict(s.split_sizes)}.",
        f"- Transformers: presets `var-tiny` / `mvar-tiny` / `mvar-tiny-scale-markov`; {s.steps} "
        f"iterations from scratch, batch {s.batch_size}, lr {s.lr}, warm-up {s.warmup_steps}; "
        f"MVAR† fine-tuned {s.finetune_steps} iterations from the VAR-tiny weights.",
        "- Artifacts (content-keyed, see `mvar.cache`): "
        + "; ".join(f"`{k}` {a.key[:12]}" for k, a in r.artifacts.items()),
        "",
    ]
    md = out / "README.md"
    atomic_write(md, lambda p: p.write_text("\n".join(lines)))
    log.info("wrote %s", md)
    return md
