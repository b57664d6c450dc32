"""Where VAR's attention goes: per key scale and per spatial distance (``nox -s repro_attention``).

The evidence behind MVAR's scale- and spatial-Markov conditioning (docs/mvar.md §1–2, its motivation
figure), measured with :mod:`mvar.analysis` during teacher forcing on the VQ-VAE's tokens of
held-out images::

    python -m repro.attention_analysis                                 # random-init var-tiny
    python -m repro.attention_analysis --model var-tiny --ckpt <trained var-tiny .pth> \\
        --vae-ckpt <its VQ-VAE .pth>                                   # held-out shapes images
    python -m repro.attention_analysis --model var-d16 --ckpt var_d16.pth \\
        --vae-ckpt vae_ch160v4096z32.pth --images <folder of 256 px PNGs | .npy | .npz> \\
        --device cuda                                                  # paper scale, a GPU

Without ``--images`` it uses held-out images of the generated shapes data set
(``mvar.data.SyntheticShapes`` with seed 1; the embedded training uses seed 0) with their
labels. A folder holds RGB PNG/JPEG files of the VQ-VAE's image size; an ``.npy`` holds uint8
(N, H, W, 3); an ``.npz`` holds them as ``arr_0`` (the ADM layout), with optional int labels as
``labels``. Images without labels are conditioned on the null class (``--label`` sets one).

Writes under ``<out>/attention/``: ``attention.csv`` (long format, table
``attention-analysis``; rows of other models already there are kept), ``<model>.npz`` (every
sum, per layer and head), ``<model>.json`` (how it was made), ``attention.md`` and
``figures/<model>_{scale_mass,window_mass,query_maps}.png``. ``--from-npz`` redraws figures and
markdown from a saved ``.npz`` without running a model.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvar.analysis import (
    KEY_OFFSETS,
    OFFSET_NAMES,
    AttentionAnalysis,
    analyse,
    analysis_rows,
    parse_metric,
)
from mvar.io import atomic_write, atomic_write_json
from repro.report import ResultRow, capture_environment, save_figure, write_csv

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HELD_OUT_SEED = 1  # SyntheticShapes seed of held-out images (the embedded training uses 0)


class InputError(ValueError):
    """Bad user input: reported as one line before any expensive work."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def load_images(path: str | Path, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, size, size, 3) images and optional int labels from a folder, .npy or .npz."""
    p = Path(path)
    labels = None
    if p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{p}: no {'/'.join(IMAGE_SUFFIXES)} images in the folder")
        imgs = []
        for f in files:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB")))
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise InputError(
                f"{p}: images of different sizes {sorted(shapes)}; expected all {size}x{size}"
            )
        arr = np.stack(imgs)
    elif p.suffix == ".npy" and p.is_file():
        arr = np.load(p, allow_pickle=False)
    elif p.suffix == ".npz" and p.is_file():
        with np.load(p, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise InputError(f"{p}: no 'arr_0' array (images); found {z.files}")
            arr = z["arr_0"]
            if "labels" in z.files:
                labels = np.asarray(z["labels"])
    else:
        raise InputError(f"{p}: not a folder of images, an .npy or an .npz file (or missing)")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise InputError(
            f"{p}: expected uint8 images (N, {size}, {size}, 3), got {arr.dtype} "
            f"{arr.shape} (resize or crop them to the VQ-VAE's {size} px first)"
        )
    if labels is not None and (labels.shape != (arr.shape[0],) or labels.dtype.kind not in "iu"):
        raise InputError(
            f"{p}: 'labels' must be ({arr.shape[0]},) integers, got {labels.dtype} {labels.shape}"
        )
    return arr, labels


def to_model_range(arr_NHW3: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (the VQ-VAE's input range)."""
    return torch.from_numpy(arr_NHW3).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def held_out_shapes(n: int, size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mvar.data import SyntheticShapes

    data = SyntheticShapes(
        min(num_classes, 10), math.ceil(n / min(num_classes, 10)), size, seed=HELD_OUT_SEED
    )
    items = [data[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _file_record(path: str | None) -> dict[str, str]:
    if path is None:
        return {"path": "random init (seed 0)", "sha256": ""}
    from mvar.checkpoint import resolve_checkpoint
    from mvar.metrics import sha256_file

    p = resolve_checkpoint(path)
    return {"path": str(p), "sha256": sha256_file(p)}


# ---------------------------------------------------------------------------------------------
# Figures (drawn from an AttentionAnalysis, i.e. from the saved .npz)
# ---------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale_labels(a: AttentionAnalysis) -> list[str]:
    return [f"{pn}²" for pn in a.patch_nums]


def plot_scale_mass(a: AttentionAnalysis, png: Path) -> Path:
    """Query-scale × key-scale heatmap (layers and heads pooled), percent annotations."""
    plt = _plt()
    import seaborn as sns

    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(7.2, 6))
    labels = _scale_labels(a)
    m = a.scale_mass() * 100
    sns.heatmap(
        m,
        annot=True,
        fmt=".0f",
        cmap="rocket_r",
        vmin=0,
        vmax=100,
        square=True,
        xticklabels=labels,
        yticklabels=labels,
        cbar_kws={"label": "% of attention"},
        annot_kws={"fontsize": 7},
        ax=ax,
        mask=~np.isfinite(m),
    )
    ax.set_xlabel("key scale")
    ax.set_ylabel("query scale")
    ax.set_title(
        f"{a.model}: where each scale's attention goes\n"
        f"({a.num_images} images, {a.num_layers} layers × {a.num_heads} heads pooled)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, png)


def plot_window_mass(a: AttentionAnalysis, png: Path) -> Path:
    """Share of the own / previous scale's mass inside a k×k NATTEN window, per query scale."""
    plt = _plt()
    import pandas as pd
    import seaborn as sns

    recs = []
    for o in KEY_OFFSETS:
        w = a.window_mass(o, "natten")
        for q, pn in enumerate(a.patch_nums):
            if pn < 3 or not np.isfinite(w[q, 0]):
                continue
            for k in [*range(1, pn, 2), pn]:
                recs.append(
                    {
                        "key scale": f"{OFFSET_NAMES[o]} scale",
                        "k": k,
                        "share": w[q, k - 1],
                        "query scale": f"{pn}²",
                    }
                )
    df = pd.DataFrame(recs)
    panels = [p for p in ("own scale", "previous scale") if p in set(df["key scale"])]
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sns.lineplot(
            data=df[df["key scale"] == panel],
            x="k",
            y="share",
            hue="query scale",
            marker="o",
            ax=ax,
            palette="viridis",
        )
        ax.axvline(a.kernel_size, color="crimson", ls="--", lw=1)
        ax.text(a.kernel_size, 0.02, f" k = {a.kernel_size} (MVAR)", color="crimson", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("window side k (NATTEN rule; last point = the whole grid)")
        ax.set_ylabel("share of that scale's attention inside the window")
        ax.set_title(f"{a.model}: {panel}")
    fig.tight_layout()
    return save_figure(fig, png)


def plot_query_maps(a: AttentionAnalysis, png: Path) -> Path:
    """Rows: tracked queries; columns: key scales; colour: attention (images, heads, layers
    pooled) over each key scale's grid; the cross marks the query's position."""
    plt = _plt()
    S = a.num_scales
    Q = len(a.tracked_queries)
    fig, axes = plt.subplots(Q, S, figsize=(1.6 * S, 1.8 * Q + 0.4), squeeze=False)
    begin = np.cumsum([0, *[pn * pn for pn in a.patch_nums]])
    for ti, (qs, r, c) in enumerate(a.tracked_queries):
        row = a.query_map(ti)
        vmax = float(row.max()) or 1.0
        for ks, pn in enumerate(a.patch_nums):
            ax = axes[ti, ks]
            ax.set_xticks([])
            ax.set_yticks([])
            grid = row[begin[ks] : begin[ks + 1]].reshape(pn, pn)
            if ks > qs:
                ax.axis("off")
                continue
            ax.imshow(grid, cmap="magma", vmin=0, vmax=vmax)
            pq = a.patch_nums[qs]
            # the query's centre on this key scale's grid: (x + 0.5)·pn/pq − 0.5
            ax.plot((c + 0.5) * pn / pq - 0.5, (r + 0.5) * pn / pq - 0.5, "c+", ms=7, mew=1.5)
            ax.set_title(f"{pn}²: {grid.sum() * 100:.0f}%", fontsize=7)
            if ks == 0:
                ax.set_ylabel(f"q {pq}² ({r},{c})", fontsize=7)
    fig.suptitle(
        f"{a.model}: attention of single queries over each key scale (colour shared per row)",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, png)


FIGURES = {
    "scale_mass": plot_scale_mass,
    "window_mass": plot_window_mass,
    "query_maps": plot_query_maps,
}


# ---------------------------------------------------------------------------------------------
# CSV and markdown
# ---------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[ResultRow]:
    """Rows of an existing long-format CSV (to keep other models' rows when adding one)."""
    if not path.is_file():
        return []
    out = []
    num = {"value", "paper_value"}
    with path.open(newline="") as f:
        for d in csv.DictReader(f):
            kw: dict[str, Any] = {}
            for fld in fields(ResultRow):
                v = d.get(fld.name, "")
                if fld.name in num:
                    kw[fld.name] = float(v) if v != "" else None
                elif fld.name == "batch":
                    kw[fld.name] = int(float(v)) if v != "" else None
                else:
                    kw[fld.name] = v
            out.append(ResultRow(**kw))
    return out


def _value(rows: list[ResultRow], model: str, name: str, **labels: str) -> float | None:
    for r in rows:
        n, lab = parse_metric(r.metric)
        if r.model == model and n == name and all(lab.get(k) == v for k, v in labels.items()):
            return r.value
    return None


SUMMARY_KEYS = {
    "own": "mass on the own scale",
    "previous": "mass on the previous scale",
    "earlier": "mass on earlier scales",
}


def summary(rows: list[ResultRow], model: str, meta: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one model, read from its CSV rows."""
    pooled = {"layer": "all", "head": "all"}
    out: dict[str, float | None] = {
        SUMMARY_KEYS[ks]: _value(rows, model, "scale_mass", **pooled, qs="all", ks=ks)
        for ks in SUMMARY_KEYS
    }
    k = meta["kernel_size"]
    pn = meta["patch_nums"]
    for q in range(meta["refine_step"], len(pn)):
        out[f"own {pn[q]}² scale inside {k}×{k} (NATTEN)"] = _value(
            rows, model, "window_mass", **pooled, qs=str(q), offset="own", rule="natten", k=str(k)
        )
        out[f"previous-scale mass of {pn[q]}² inside {k}×{k} (NATTEN)"] = _value(
            rows,
            model,
            "window_mass",
            **pooled,
            qs=str(q),
            offset="previous",
            rule="natten",
            k=str(k),
        )
    out["kept by MVAR's pattern"] = _value(rows, model, "mvar_kept_mass", **pooled, qs="all")
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def describe(model: str, s: dict[str, float | None], meta: dict[str, Any]) -> str:
    """One paragraph saying what the numbers say, whatever they are."""
    own, prev, earl = (s[SUMMARY_KEYS[k]] for k in ("own", "previous", "earlier"))
    kept = s["kept by MVAR's pattern"]
    k = meta["kernel_size"]
    wins = [v for name, v in s.items() if name.startswith("own ") and v is not None]
    queries = sum(p * p for p in meta["patch_nums"])
    parts = [
        (
            f"**{model}** ({meta['weights']}): averaged over all {queries} queries of the pyramid, "
            f"{_pct(own)} of the attention falls on the query's own scale, {_pct(prev)} on the "
            f"previous scale and {_pct(earl)} on earlier ones."
        )
    ]
    if wins:
        parts.append(
            f"On the scales where MVAR uses a {k}×{k} window, that window holds "
            f"{' / '.join(_pct(v) for v in wins)} of the own-scale attention."
        )
    kept_text = (
        f"MVAR's pattern (own scale, windowed on scales ≥ {meta['refine_step']}) keeps "
        f"{_pct(kept)} of all attention mass"
    )
    if meta["arch"] == "mvar":
        kept_text += " (it is this model's own pattern, so 100% is expected)."
    elif own is not None:
        where = "concentrated on" if own >= 0.5 else "spread beyond"
        kept_text += f"; this model's attention is {where} the own scale"
        if meta["weights"] == "random init":
            kept_text += " — at random init, a property of the initialisation, not of learning"
        kept_text += "."
    parts.append(kept_text)
    return " ".join(parts)


DEFINITIONS: tuple[str, ...] = (
    (
        "`scale_mass[qs, ks]`: mean over the queries of scale qs of the attention on key scale ks "
        "(rows sum to 1); `qs=all`: over all queries, `ks=own|previous|earlier`."
    ),
    (
        "Keys of the previous scale (side p') are placed on the query's grid (side p) at their "
        "centres, c = (i + 0.5)·p/p' − 0.5; distance bin r holds keys with Chebyshev distance "
        "r − 0.5 < d ≤ r + 0.5 (the exact distance on the own scale)."
    ),
    (
        "`window_mass[rule=natten, k]`: share of that scale's attention inside the query's k×k NATTEN "
        "window (shifted inwards at the border, as MVAR's neighbourhood attention; `k=full` = the "
        "whole grid). **The figures use this rule.** `rule=centred`: keys within Chebyshev radius "
        "(k − 1)/2, cut at the border (the cumulative `distance_mass`)."
    ),
    (
        "`mvar_kept_mass`: share of a query's attention on keys MVAR's pattern keeps (own scale; "
        "inside the k×k NATTEN window on scales ≥ refine_step)."
    ),
    "Pooled values (`layer=all`, `head=all`) pool the sums of those layers and heads.",
)


def _provenance(meta: dict[str, Any], env: ResultRow) -> list[str]:
    info = meta["info"]
    ckpt, vae = meta["ckpt"], meta["vae"]
    backend = info["na_backend"] or "none (dense attention only)"
    return [
        (
            f"- transformer: `{ckpt['path']}` sha256 `{ckpt['sha256'] or '–'}`; "
            f"VQ-VAE: `{vae['path']}` sha256 `{vae['sha256'] or '–'}`"
        ),
        f"- images: {meta['images']} ({meta['num_images']}), labels: {info['labels']}",
        (
            f"- device {env.device}, model dtype {info['model_dtype']}, neighbourhood-attention "
            f"backend that ran: {backend}; torch {env.torch}, git {env.git_sha}"
        ),
        (
            f"- probabilities {info['probabilities']}; max |P·v − attention output| "
            f"{info['max_output_error']:.2g}; sums in float64"
        ),
        (
            f"- one probability block alive at a time (peak {info['peak_live_maps']}, "
            f"{info['peak_map_bytes'] / 2**20:.1f} MiB; alive when a layer starts: "
            f"{info['live_maps_at_layer_start']}); wall time {meta['wall_s']:.1f} s"
        ),
    ]


def write_markdown(out: Path, rows: list[ResultRow]) -> Path:
    """``attention.md`` from the CSV rows and each model's ``<model>.json``."""
    lines = [
        "# Attention analysis: where the attention goes",
        "",
        (
            "Source: `attention.csv` (table `attention-analysis`, long format; metric names carry "
            "their indices, e.g. `scale_mass[layer=all,head=all,qs=9,ks=8]`, `all` = pooled)."
        ),
        "",
    ]
    for model in dict.fromkeys(r.model for r in rows):
        meta_p = out / f"{model}.json"
        if not meta_p.is_file():
            log.warning("no %s: the markdown skips %s", meta_p, model)
            continue
        meta = json.loads(meta_p.read_text())
        s = summary(rows, model, meta)
        env = next(r for r in rows if r.model == model)
        lines += [f"## {model}", "", describe(model, s, meta), ""]
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {_pct(v)} |" for k, v in s.items()]
        lines += ["", "How it was made:", "", *_provenance(meta, env), ""]
        lines += [f"![{kind}](figures/{model}_{kind}.png)" for kind in FIGURES]
        lines += [""]
    lines += ["## Definitions", "", *(f"- {d}" for d in DEFINITIONS), ""]
    path = atomic_write(out / "attention.md", lambda tmp: tmp.write_text("\n".join(lines)))
    log.info("wrote %s", path)
    return path


def run_meta(
    a: AttentionAnalysis,
    images: str,
    ckpt: str | None,
    vae_ckpt: str | None,
    wall_s: float,
    *,
    preset: str | None = None,
) -> dict[str, Any]:
    """How an analysis was made (``<model>.json``): the checkpoints with their sha256 (None:
    random init), the images, the wall time of :func:`mvar.analysis.analyse` and its ``info``."""
    return {
        "model": a.model,
        "preset": preset or a.model,
        "arch": a.arch,
        "patch_nums": list(a.patch_nums),
        "kernel_size": a.kernel_size,
        "refine_step": a.refine_step,
        "num_images": a.num_images,
        "images": images,
        "ckpt": _file_record(ckpt),
        "vae": _file_record(vae_ckpt),
        "weights": "random init" if ckpt is None else "trained",
        "wall_s": wall_s,
        "info": a.info,
    }


def write_outputs(
    a: AttentionAnalysis, out: Path, meta: dict[str, Any], env_device: str | None = None
) -> list[Path]:
    """CSV (merged with other models' rows), npz, json, figures and markdown of one analysis."""
    out.mkdir(parents=True, exist_ok=True)
    env = capture_environment(
        env_device or a.info.get("device", "cpu"), a.info.get("model_dtype", "float32")
    )
    csv_path = out / "attention.csv"
    rows = [r for r in read_rows(csv_path) if r.model != a.model] + analysis_rows(a, env)
    made = [write_csv(rows, csv_path)]
    made.append(a.save_npz(out / f"{a.model}.npz"))
    made.append(atomic_write_json(out / f"{a.model}.json", meta))
    figs = out / "figures"
    made += [plot(a, figs / f"{a.model}_{kind}.png") for kind, plot in FIGURES.items()]
    made.append(write_markdown(out, rows))
    return made


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repro.attention_analysis", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="var-tiny", help="model preset or released name")
    p.add_argument("--embedded", metavar="STUDY", nargs="?", const="default",
                   help="analyse the embedded study's trained model (--model var-tiny, mvar-tiny, "
                   "...) and tokenizer on its held-out images; trains them first if the cache "
                   "has none (repro.embedded; STUDY default: default)")  # fmt: skip
    p.add_argument("--cache-dir", default=os.environ.get("MVAR_CACHE_DIR", "outputs/cache"),
                   help="with --embedded: the study's artifact cache (default %(default)s)")
    p.add_argument("--ckpt", help="transformer checkpoint (default: random init, labelled)")
    p.add_argument("--vae-ckpt", help="VQ-VAE checkpoint (default: random init, labelled)")
    p.add_argument("--images", help="folder of PNG/JPEG, .npy or .npz of uint8 (N, H, W, 3)")
    p.add_argument("--num-images", type=int, default=16, help="images used (default 16)")
    p.add_argument("--label", type=int, help="class of images without labels (default: null)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", help="model name in the results (default: --model)")
    p.add_argument("--out", default="reports", help="reports folder; writes <out>/attention/")
    p.add_argument("--from-npz", help="redraw figures/markdown from a saved <model>.npz")
    p.add_argument("--no-check", action="store_true", help="skip the P·v = output check")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    return p


def run(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out) / "attention"
    if args.from_npz:
        a = AttentionAnalysis.load_npz(args.from_npz)
        meta = json.loads(Path(args.from_npz).with_suffix(".json").read_text())
        return write_outputs(a, out, meta)
    from mvar.config import CHECKPOINT_PRESETS, get_preset

    try:
        cfg = get_preset(CHECKPOINT_PRESETS.get(args.model, args.model))
    except KeyError as e:
        raise InputError(str(e).strip('"')) from None
    if args.num_images < 1 or args.batch_size < 1:
        raise InputError("--num-images and --batch-size must be >= 1")
    size = cfg.vae.image_size
    # Inputs checked before any model is built.
    if args.embedded:
        if args.ckpt or args.vae_ckpt or args.images:
            raise InputError("--embedded takes the checkpoints and images from the embedded "
                             "study; do not pass --ckpt, --vae-ckpt or --images with it")  # fmt: skip
        from mvar.cache import ArtifactCache
        from repro import embedded

        if args.model not in embedded.MODELS:
            raise InputError(f"--embedded analyses one of {', '.join(embedded.MODELS)}, "
                             f"got --model {args.model!r}")  # fmt: skip
        study = embedded.get_study(args.embedded)
        st = embedded.Stages(ArtifactCache(args.cache_dir, embedded.study_code_fingerprint()),
                             study, torch.device(args.device))  # fmt: skip
        arts, _ = embedded.trained_models(st, [args.model])
        args.ckpt = str(arts[args.model].path / arts[args.model].info["file"])
        args.vae_ckpt = str(arts["vae"].path / arts["vae"].info["file"])
        args.name = args.name or args.model
        args.model = embedded.MODELS[args.model]
        cfg = get_preset(args.model)
        holdout = study.split("holdout")
        items = [holdout[i] for i in range(min(args.num_images, len(holdout)))]
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items])
        source = f"held-out images of the embedded study `{study.name}`"
    elif args.images:
        arr, labels_np = load_images(args.images, size)
        arr = arr[: args.num_images]
        images = to_model_range(arr)
        if labels_np is not None:
            labels = torch.from_numpy(labels_np[: len(arr)].astype(np.int64))
        elif args.label is not None:
            labels = torch.full((len(arr),), args.label, dtype=torch.long)
        else:
            labels = None
        source = f"`{args.images}`"
    else:
        images, labels = held_out_shapes(args.num_images, size, cfg.num_classes)
        source = f"held-out generated shapes (SyntheticShapes seed {HELD_OUT_SEED})"
    if labels is not None and (int(labels.min()) < 0 or int(labels.max()) > cfg.num_classes):
        raise InputError(f"labels must lie in [0, {cfg.num_classes}]")
    from mvar.checkpoint import resolve_checkpoint

    for path in (args.ckpt, args.vae_ckpt):  # a missing file fails here, before any model
        if path is not None:
            resolve_checkpoint(path)
    from mvar.checkpoint import load_pretrained

    vae, model = load_pretrained(args.model, args.ckpt, args.vae_ckpt, device=args.device)
    name = args.name or args.model
    t0 = time.perf_counter()
    a = analyse(
        model,
        vae,
        images.to(args.device),
        labels,
        batch_size=args.batch_size,
        check_outputs=not args.no_check,
        name=name,
    )
    wall = time.perf_counter() - t0
    log.info("analysed %d images of %s in %.1f s", a.num_images, name, wall)
    meta = run_meta(a, source, args.ckpt, args.vae_ckpt, wall, preset=cfg.name)
    return write_outputs(a, out, meta)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        made = run(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for p in made:
        log.info("wrote %s", p)
    return made


if __name__ == "__main__":
    main()
