"""Which scales each training iteration trains: the one definition of the chunk schedule, used
by the trainer (``mvar.train``), the profiler (``repro.compute``) and the benchmarks.

* **VAR** (docs/var.md §4) trains the whole pyramid every iteration: one chunk, all scales.
* **MVAR** (official CVL-UESTC/MVAR ``trainer.py``, ``train_one_ep_ratio_k``; the paper's
  "parallel training across scales", docs/mvar.md §3): with S scales, ``refine_step`` r and
  ``ratio_k`` k (official 8), iteration g has ``p = g mod (k + S − r)``; ``p < k`` trains the
  packed chunk of scales 0..r−1 (block-diagonal mask), else the single scale ``r + p − k``.
  At 256 px (S = 10, r = 8) that is, of every 10 iterations, 8 on scales 0–7, one on scale 8
  and one on scale 9.
* **Scale-Markov-only ablation** (``spatial_markov=False``, the ablation's row (b)): the same
  chunks and weights as MVAR (0–7 / 8 / 9). Its scales 8 and 9 use full attention within the
  scale instead of a neighbourhood window, but since no scale sees another the grouping is the
  official trainer's, which only branches on ``refine_step``; so the ablation differs from
  MVAR in the attention pattern only, not in what each iteration trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from mvar.config import ModelConfig

#: Iterations on the packed chunk per cycle in the official MVAR trainer (``ratio_k = 8``).
OFFICIAL_RATIO_K = 8


def scales_label(scales: tuple[int, ...]) -> str:
    """``"0-7"`` for a packed range, ``"8"`` for one scale (history.csv, report rows)."""
    return f"{scales[0]}-{scales[-1]}" if len(scales) > 1 else str(scales[0])


@dataclass(frozen=True)
class TrainSchedule:
    """The cycle of chunks training runs through, one chunk per iteration.

    ``cycle[g % len(cycle)]`` is the chunk of iteration g; ``chunks`` are the distinct chunks in
    order of first appearance and ``weights`` how many iterations of a cycle each gets.
    """

    cycle: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.cycle or any(not c for c in self.cycle):
            raise ValueError("a training schedule needs at least one non-empty chunk")

    @classmethod
    def for_config(cls, cfg: ModelConfig, ratio_k: int = OFFICIAL_RATIO_K) -> TrainSchedule:
        """VAR: every iteration trains all scales. MVAR (both variants): ``ratio_k`` packed
        iterations on scales 0..refine_step−1, then one per later scale (module docstring)."""
        if ratio_k < 1:
            raise ValueError(f"ratio_k must be >= 1 (iterations on the packed chunk), got {ratio_k}")
        S = cfg.num_scales
        if cfg.arch == "var":
            return cls((tuple(range(S)),))
        r = min(cfg.refine_step, S)
        packed = tuple(range(r))
        cycle = [packed] * ratio_k if packed else []
        return cls(tuple(cycle) + tuple((si,) for si in range(r, S)))

    def chunk_at(self, step: int) -> tuple[int, ...]:
        """The scales iteration ``step`` trains."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.cycle[step % len(self.cycle)]

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        return tuple(dict.fromkeys(self.cycle))

    @property
    def weights(self) -> tuple[int, ...]:
        """Iterations per cycle of each of :attr:`chunks`."""
        return tuple(self.cycle.count(c) for c in self.chunks)

    def describe(self) -> str:
        """``"0-7×8 8×1 9×1"``: each chunk with its iterations per cycle."""
        return " ".join(f"{scales_label(c)}×{w}" for c, w in zip(self.chunks, self.weights))

    def weighted_mean(self, per_chunk: dict[tuple[int, ...], float]) -> float:
        """The per-iteration average of a per-chunk quantity (e.g. step time) over a cycle."""
        return sum(per_chunk[c] * w for c, w in zip(self.chunks, self.weights)) / len(self.cycle)
