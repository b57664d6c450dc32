"""MVAR: visual autoregression with scale- and spatial-Markov conditioning
(Zhang et al., ICLR 2026, arXiv 2505.12742; official code CVL-UESTC/MVAR @ d0e035a).

Same parameters, embeddings, blocks, head and teacher-forcing inputs as VAR
(``baselines/var.py``); only the attention pattern changes:

1. **Scale-Markov** (docs/mvar.md §1): block-diagonal attention between scales. Scale s attends only
   to its own tokens; the previous scales reach it through its *input*, the area-downsampled
   cumulative f̂. Every scale is therefore an independent forward: no KV cache at inference,
   and peak memory is set by the largest scale rather than the 680-token history.
2. **Spatial-Markov** (docs/mvar.md §2): on scales ``si >= refine_step`` (13×13 and 16×16 at 256 px)
   the within-scale attention is 2-D neighbourhood attention with NATTEN's shifted window
   (kernel 7, softmax scale 1 on VAR's cosine q and k). With ``spatial_markov=False`` the model
   is the ablation's "(b) scale-Markov only".

Training runs chunks of scales (docs/mvar.md §3; the schedule is ``mvar.schedule``):
``forward(..., scales=range(0, 8))`` packs scales 0..7 with the block-diagonal mask,
``scales=[8]`` and ``[9]`` run alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from mvar.blocks import AttendFn, NeighbourhoodAttention
from mvar.transformer import ScaleARTransformer
from mvar.config import ModelConfig
from mvar.sampling import ScaleStep


class MVAR(ScaleARTransformer):
    GUIDANCE_ONE_RUNS_UNCONDITIONAL = False  # the official MVAR sampler skips guidance at 1.0

    def __init__(self, cfg: ModelConfig, na_backend: str | None = None) -> None:
        if cfg.arch != "mvar":
            raise ValueError(f"MVAR needs a config with arch='mvar', got {cfg.name!r} ({cfg.arch})")
        super().__init__(cfg)
        self.neighbourhood_attention = NeighbourhoodAttention(
            cfg.kernel_size, self.dense_attention.scale, backend=na_backend
        )

    def build_attn_bias(self) -> Tensor:
        # Block-diagonal: a query sees only the keys of its own scale (docs/mvar.md §1, 110,468
        # finite entries at 256 px against VAR's 286,434).
        return self.scale_mask(torch.eq)

    def _attend_scales(self, scales: Sequence[int]) -> AttendFn:
        """The attention of one chunk: NA on a lone neighbourhood scale, else dense with the
        block-diagonal mask restricted to the chunk's tokens (no mask for a single scale)."""
        if len(scales) == 1 and self.config.uses_neighbourhood(scales[0]):
            pn = self.patch_nums[scales[0]]

            def attend_na(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return self.neighbourhood_attention(q, k, v, (pn, pn))

            return attend_na
        bias: Tensor | None = None
        if len(scales) > 1:
            token_idx = torch.cat(
                [torch.arange(*self.begin_ends[si], device=self.lvl_1L.device) for si in scales]
            )
            bias = self.attn_bias_for_masking[:, :, token_idx][:, :, :, token_idx]

        def attend_dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.dense_attention(q, k, v, bias)

        return attend_dense

    def forward_groups(self, scales: Iterable[int]) -> list[list[int]]:
        """How one forward call splits the scales it is asked for into passes: consecutive
        full-attention scales are packed together (block-diagonal mask), each neighbourhood
        scale runs alone. This is not the training schedule (which chunk each iteration
        trains): that is ``mvar.schedule.TrainSchedule``."""
        out: list[list[int]] = []
        for si in scales:
            if not 0 <= si < len(self.patch_nums):
                raise ValueError(f"scale {si} out of range 0..{len(self.patch_nums) - 1}")
            if self.config.uses_neighbourhood(si):
                out.append([si])
            elif out and not self.config.uses_neighbourhood(out[-1][-1]):
                out[-1].append(si)
            else:
                out.append([si])
        return out

    def forward(
        self, label_B: Tensor, x_BLCv: Tensor, scales: Iterable[int] | None = None
    ) -> Tensor:
        """Teacher forcing: logits of the tokens of ``scales`` (default: all), concatenated in
        scale order, shape (B, Σ pn², V).

        ``x_BLCv`` is the full teacher-forcing input (B, L − first_l, Cvae); only the rows of
        the requested scales are used, since no scale sees another.
        """
        scales = sorted(set(range(len(self.patch_nums)) if scales is None else scales))
        cond_BD = self.class_condition(label_B)
        logits = []
        for chunk in self.forward_groups(scales):
            x_BlC = self.embed_inputs(cond_BD, x_BLCv, chunk)
            attend = self._attend_scales(chunk)
            h_BlC = self.run_blocks(x_BlC, cond_BD, [attend] * len(self.blocks))
            logits.append(self.get_logits(h_BlC, cond_BD))
        return torch.cat(logits, dim=1)

    def sampling_step(self) -> tuple[ScaleStep, Callable[[], int]]:
        """Each scale is one independent forward of its own tokens (no KV cache)."""

        def step(si: int, x_BlC: Tensor, cond_BD: Tensor) -> Tensor:
            attend = self._attend_scales([si])
            return self.run_blocks(x_BlC, cond_BD, [attend] * len(self.blocks))

        return step, lambda: 0
