"""Model-step benchmarks: VAR vs MVAR side by side in one run, at a CPU-sized preset.

    pytest bench/bench_model_steps.py --benchmark-json reports/bench/model_steps.json
    python -m bench.to_csv reports/bench/model_steps.json reports/bench/model_steps.csv

Workloads (``benchmark.extra_info`` holds every parameter):

* ``sample``: one full next-scale sampling call (tokens only, no VQ-VAE decode), CFG 1.5.
  VAR carries its KV cache across scales; MVAR runs each scale alone (docs/mvar.md §1).
* ``train_step``: the trainer's iteration (``mvar.step.train_step``: forward, backward, clip,
  AdamW over the trainer's parameter groups). VAR trains the whole pyramid at once; MVAR one
  chunk per iteration following the trainer's schedule (``mvar.schedule``: 0-7 ×8, 8, 9), and
  the rounds run whole cycles, so its row is the schedule-weighted mean.

The presets are tiny (depth 2, width 128) so this finishes in a minute on two cores; paper-size
timings need a GPU (``nox -s repro_table2`` on a GPU machine measures them).
"""

from __future__ import annotations

import pytest
import torch

from mvar.build import build_model, build_vqvae
from mvar.config import get_preset
from mvar.schedule import TrainSchedule
from mvar.step import make_optimizer, train_step

BATCH = 8


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vqvae(get_preset("var-tiny").vae).eval()


def _tokens(vae: torch.nn.Module, B: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(vae.cfg.vocab_size, (B, pn * pn), generator=g) for pn in vae.cfg.patch_nums]


def _info(benchmark, preset: str, workload: str) -> None:
    benchmark.group = workload
    benchmark.extra_info.update(
        model=preset, workload=workload, batch=BATCH, threads=torch.get_num_threads(), dtype="float32"
    )


@pytest.mark.parametrize("preset", ["var-tiny", "mvar-tiny"])
def test_sample(benchmark, vae: torch.nn.Module, preset: str) -> None:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    label = torch.arange(BATCH)
    _info(benchmark, preset, "sample")

    def run() -> None:
        model.sample(vae, label, guidance=1.5, top_k=100, top_p=0.9, g_seed=0, decode=False)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("preset", ["var-tiny", "mvar-tiny"])
def test_train_step(benchmark, vae: torch.nn.Module, preset: str) -> None:
    torch.manual_seed(0)
    model = build_model(preset).train()
    opt = make_optimizer(model, lr=1e-4)
    idx_Bl, label = _tokens(vae, BATCH), torch.arange(BATCH)
    with torch.no_grad():  # the VQ-VAE is frozen (as in the trainer)
        x_BLCv, target_BL = vae.idx_to_teacher_input(idx_Bl), torch.cat(idx_Bl, dim=1)
    schedule = TrainSchedule.for_config(model.config)
    _info(benchmark, preset, "train_step")
    # One round = one whole cycle of the schedule, so the per-iteration time (round time /
    # cycle length, bench.to_csv) is the schedule-weighted mean: MVAR (8·t[0-7]+t[8]+t[9])/10.
    benchmark.extra_info["schedule"] = schedule.describe()
    benchmark.extra_info["iterations_per_round"] = len(schedule.cycle)

    def run() -> None:
        for scales in schedule.cycle:
            train_step(model, opt, label, x_BLCv, target_BL, scales)

    benchmark.pedantic(run, rounds=max(2, 6 // len(schedule.cycle)), warmup_rounds=1)
