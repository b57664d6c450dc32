"""Training: the optimiser recipe, the schedule, learning on generated data, exact resume."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from mvar.build import build_model
from mvar.checkpoint import load_transformer
from mvar.train import TrainConfig, lr_at, param_groups, train

SMALL = {"synthetic_classes": 4, "synthetic_per_class": 2, "batch_size": 4, "ckpt_every": 100, "log_every": 1}


def test_weight_decay_groups_follow_var() -> None:
    model = build_model("var-tiny", device="meta", init=False)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "class_emb.weight" in decay and "blocks.0.attn.mat_qkv.weight" in decay
    assert "head.weight" in decay and "word_embed.weight" in decay
    for n in ("pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11",
              "blocks.0.attn.q_bias", "head.bias"):  # fmt: skip
        assert n in no_decay, n
    assert decay | no_decay == set(names.values())


def test_schedule_warms_up_then_decays_to_wpe() -> None:
    cfg = TrainConfig(steps=1000, batch_size=256, warmup_steps=20, wpe=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.005e-4)
    assert lr_at(20, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) < 1e-4
    assert lr_at(999, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(20, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize("model", ["var-tiny", "mvar-tiny"])
def test_loss_goes_down_on_generated_data(tmp_path: Path, model: str) -> None:
    cfg = TrainConfig(model=model, out_dir=str(tmp_path), steps=24, lr=3e-3, warmup_steps=1, **SMALL)
    train(cfg)
    hist = (tmp_path / "history.csv").read_text().splitlines()[1:]
    rows = [line.split(",") for line in hist]
    by_chunk: dict[str, list[float]] = {}
    for step, chunk, loss, *_ in rows:
        by_chunk.setdefault(chunk, []).append(float(loss))
    for chunk, losses in by_chunk.items():
        assert losses[-1] < 0.9 * losses[0], f"chunk {chunk}: loss {losses[0]} -> {losses[-1]}"


def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    base = TrainConfig(model="mvar-tiny", steps=6, lr=1e-3, **SMALL)
    straight = train(dataclasses.replace(base, out_dir=str(tmp_path / "a")))
    cut = dataclasses.replace(base, out_dir=str(tmp_path / "b"), stop_after=4)
    train(cut)
    resumed = train(dataclasses.replace(cut, stop_after=None))
    a, b = load_transformer(straight, "mvar-tiny"), load_transformer(resumed, "mvar-tiny")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{k} differs after resume"
    ha = (tmp_path / "a" / "history.csv").read_text()
    hb = (tmp_path / "b" / "history.csv").read_text()
    strip = lambda t: [",".join(line.split(",")[:3]) for line in t.splitlines()]
    assert strip(ha) == strip(hb)  # same steps, chunks and losses; only timings differ
