"""Training: the optimiser recipe, the schedule, learning on generated data, exact resume."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from mvar.build import build_model
from mvar.checkpoint import load_transformer
from mvar.config import get_preset
from mvar.schedule import TrainSchedule
from mvar.train import TrainConfig, TrainError, build_parser, lr_at, main, param_groups, train

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
    # ratio_k=1 (chunks 0-7, 8, 9 in turn) so each chunk gets 8 of the 24 iterations.
    cfg = TrainConfig(model=model, out_dir=str(tmp_path), steps=24, lr=3e-3, warmup_steps=1,
                      ratio_k=1, **SMALL)  # fmt: skip
    train(cfg)
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "step,scales,loss,lr,seconds"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[1] for r in rows] == ["0-9" if model == "var-tiny" else ["0-7", "8", "9"][g % 3]
                                    for g in range(24)]  # fmt: skip
    assert all(float(r[4]) > 0 for r in rows)  # per-step wall time is recorded
    by_chunk: dict[str, list[float]] = {}
    for _, chunk, loss, *_ in rows:
        by_chunk.setdefault(chunk, []).append(float(loss))
    for chunk, losses in by_chunk.items():
        assert losses[-1] < 0.9 * losses[0], f"chunk {chunk}: loss {losses[0]} -> {losses[-1]}"


def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    # Ten iterations of the official schedule (ratio_k 8), cut after 9: 0-7 ×8, 8 | 9.
    base = TrainConfig(model="mvar-tiny", steps=10, lr=1e-3, **SMALL)
    straight = train(dataclasses.replace(base, out_dir=str(tmp_path / "a")))
    cut = dataclasses.replace(base, out_dir=str(tmp_path / "b"), stop_after=9)
    train(cut)
    resumed = train(dataclasses.replace(cut, stop_after=None))
    a, b = load_transformer(straight, "mvar-tiny"), load_transformer(resumed, "mvar-tiny")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{k} differs after resume"
    ha = (tmp_path / "a" / "history.csv").read_text()
    hb = (tmp_path / "b" / "history.csv").read_text()
    strip = lambda t: [",".join(line.split(",")[:3]) for line in t.splitlines()]
    assert strip(ha) == strip(hb)  # same steps, scales and losses; only timings differ
    assert [line.split(",")[1] for line in ha.splitlines()[1:]] == ["0-7"] * 8 + ["8", "9"]


# --- the chunk schedule (official train_one_ep_ratio_k) ----------------------------------------


def _official_rule(g: int, S: int, refine_step: int, ratio_k: int) -> tuple[int, ...]:
    cur_prog = g % (ratio_k + S - refine_step)
    if cur_prog < ratio_k:
        return tuple(range(refine_step))
    return (refine_step + cur_prog - ratio_k,)


@pytest.mark.parametrize("preset", ["mvar-d16", "mvar-tiny", "mvar-d16-scale-markov", "mvar-tiny-512"])
@pytest.mark.parametrize("ratio_k", [8, 1, 3])
def test_schedule_follows_the_official_rule_for_20_iterations(preset: str, ratio_k: int) -> None:
    cfg = get_preset(preset)
    sched = TrainSchedule.for_config(cfg, ratio_k)
    got = [sched.chunk_at(g) for g in range(20)]
    assert got == [_official_rule(g, cfg.num_scales, cfg.refine_step, ratio_k) for g in range(20)]
    if ratio_k == 8 and cfg.num_scales == 10:  # of every 10 iterations: 8 packed, one 8, one 9
        assert got[:10] == [tuple(range(8))] * 8 + [(8,), (9,)] and got[10:] == got[:10]
        assert sched.chunks == (tuple(range(8)), (8,), (9,)) and sched.weights == (8, 1, 1)


def test_scale_markov_ablation_trains_mvars_chunks() -> None:
    # The ablation differs from MVAR in the attention pattern only: same chunks and weights.
    a = TrainSchedule.for_config(get_preset("mvar-tiny-scale-markov"))
    b = TrainSchedule.for_config(get_preset("mvar-tiny"))
    assert a == b


def test_var_trains_the_whole_pyramid_every_iteration() -> None:
    sched = TrainSchedule.for_config(get_preset("var-d16"), ratio_k=8)
    assert {sched.chunk_at(g) for g in range(20)} == {tuple(range(10))}
    assert sched.weighted_mean({tuple(range(10)): 2.0}) == 2.0


def test_weighted_mean_follows_the_schedule_weights() -> None:
    sched = TrainSchedule.for_config(get_preset("mvar-d16"))
    assert sched.weighted_mean({tuple(range(8)): 1.0, (8,): 3.0, (9,): 5.0}) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="ratio_k"):
        TrainSchedule.for_config(get_preset("mvar-d16"), ratio_k=0)


# --- bad input: one clear error before any work (issue 10) ------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", -5, "--steps must be a positive integer"),
        ("steps", 0, "--steps must be a positive integer"),
        ("batch_size", 0, "--batch-size must be a positive integer"),
        ("batch_size", -4, "--batch-size must be a positive integer"),
        ("ckpt_every", 0, "--ckpt-every must be a positive integer"),
        ("log_every", 0, "--log-every must be a positive integer"),
        ("ratio_k", 0, "--ratio-k must be a positive integer"),
        ("amp", "fp8", "--amp must be one of none, fp16, bf16"),
        ("lr", -1e-3, "--lr must be a positive number"),
        ("model", "mvar-d17", "unknown model preset"),
    ],
)
def test_bad_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "argv",
    [["--steps", "-5"], ["--batch-size", "0"], ["--ckpt-every", "0"], ["--amp", "fp8"]],
)
def test_cli_bad_settings_exit_with_one_line(argv: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar train: error:"), err
    assert not (tmp_path / "run" / "last.pth").exists()


def test_out_that_is_a_file_is_refused_before_training(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        main(["--out", str(f), "--steps", "1"])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_help_shows_text_and_default_for_every_option() -> None:
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
    text = parser.format_help()
    assert "(default: 8)" in text and "--ratio-k" in text and "{none,fp16,bf16}" in text
    assert text.count("(default:") == len(parser._actions) - 1


def _run(tmp_path: Path, **kw: object) -> Path:
    cfg = TrainConfig(**{"model": "mvar-tiny", "out_dir": str(tmp_path), "steps": 2, "lr": 1e-3,
                         **SMALL, **kw})  # fmt: skip
    return train(cfg)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"batch_size": 8}, "batch_size"), ({"seed": 1}, "seed"), ({"lr": 2e-3}, "lr"),
     ({"steps": 4}, "steps")],
)
def test_resume_with_changed_settings_is_refused(tmp_path: Path, change: dict, field: str) -> None:
    _run(tmp_path, stop_after=1)
    with pytest.raises(TrainError, match=rf"settings differ.*{field}: saved .*last\.pth|last\.pth.*{field}: saved"):
        _run(tmp_path, **change)


def test_resume_with_changed_settings_when_allowed_records_both(tmp_path: Path) -> None:
    _run(tmp_path, stop_after=1)
    path = _run(tmp_path, steps=3, allow_changed_args=True)
    state = torch.load(path, weights_only=True)
    assert state["trainer"]["step"] == 3
    (change,) = state["arg_changes"]
    assert change["step"] == 1 and change["saved"]["steps"] == 2 and change["now"]["steps"] == 3
    assert state["args"]["steps"] == 3


def test_resume_with_another_model_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, stop_after=1)
    with pytest.raises(TrainError, match="model: saved 'mvar-tiny', now 'mvar-tiny-scale-markov'"):
        _run(tmp_path, model="mvar-tiny-scale-markov")
    # Another architecture cannot be resumed, even when changes are allowed.
    for allow in (False, True):
        with pytest.raises(TrainError, match="holds mvar_wo_ddp weights.*another architecture"):
            _run(tmp_path, model="var-tiny", allow_changed_args=allow)


def test_resume_from_a_plain_state_dict_is_one_clear_error(tmp_path: Path) -> None:
    torch.save(build_model("mvar-tiny").state_dict(), tmp_path / "last.pth")
    with pytest.raises(TrainError, match="not a training checkpoint written by mvar.train"):
        _run(tmp_path)


def test_in_process_tokens_are_used_and_checked(tmp_path: Path) -> None:
    from mvar.data import TokenCache

    cfg = get_preset("mvar-tiny")
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(cfg.vocab_size, (6, pn * pn), generator=g) for pn in cfg.patch_nums]
    tokens = TokenCache(idx, torch.arange(6) % 3)
    path = train(TrainConfig(model="mvar-tiny", out_dir=str(tmp_path / "a"), steps=2, **SMALL),
                 tokens=tokens)  # fmt: skip
    assert torch.load(path, weights_only=True)["trainer"]["step"] == 2
    bad = TokenCache(idx[:-1], tokens.labels)
    with pytest.raises(TrainError, match="tokens per scale"):
        train(TrainConfig(model="mvar-tiny", out_dir=str(tmp_path / "b"), steps=2, **SMALL), tokens=bad)
    # A resume on other tokens is refused (the tokens' sha256 is in the checkpoint).
    other = TokenCache([t.flip(0) for t in idx], tokens.labels.flip(0))
    with pytest.raises(TrainError, match="training tokens differ"):
        train(TrainConfig(model="mvar-tiny", out_dir=str(tmp_path / "a"), steps=2, **SMALL),
              tokens=other)
