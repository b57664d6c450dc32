"""VAR: next-scale prediction with block-causal attention (Tian et al., NeurIPS 2024).

The baseline MVAR is measured against, built on ``mvar.transformer`` and the blocks in ``mvar.blocks`` (MVAR only
swaps the attention pattern). Faithful to FoundationVision/VAR @ 78b9539: the official
``var_d16.pth`` … ``var_d30.pth`` load with ``strict=True`` and reproduce its outputs
(``docs/parity.md``).

* Teacher forcing: the whole L-token pyramid in one pass; a token sees every token of its own
  and of all earlier scales (the block-causal ``attn_bias_for_masking``).
* Sampling: one scale per step, with a KV cache that keeps K and V of every earlier scale in
  every layer — the memory MVAR removes (Table 2 "KV cache": 5440 MiB for d16 at batch 32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from mvar.blocks import AttendFn
from mvar.transformer import ScaleARTransformer
from mvar.config import ModelConfig
from mvar.sampling import ScaleStep


class KVCache:
    """Per layer, the l2-normalised keys and the values of every scale seen so far."""

    def __init__(self, depth: int) -> None:
        self.k: list[Tensor | None] = [None] * depth
        self.v: list[Tensor | None] = [None] * depth

    def extend(self, layer: int, k_BHlc: Tensor, v_BHlc: Tensor) -> tuple[Tensor, Tensor]:
        prev_k, prev_v = self.k[layer], self.v[layer]
        if prev_k is not None and prev_v is not None:
            k_BHlc = torch.cat((prev_k, k_BHlc), dim=2)
            v_BHlc = torch.cat((prev_v, v_BHlc), dim=2)
        self.k[layer], self.v[layer] = k_BHlc, v_BHlc
        return k_BHlc, v_BHlc

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v) if t is not None)


class VAR(ScaleARTransformer):
    GUIDANCE_ONE_RUNS_UNCONDITIONAL = True  # the official VAR sampler ramps guidance even at 1.0

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.arch != "var":
            raise ValueError(f"VAR needs a config with arch='var', got {cfg.name!r} ({cfg.arch})")
        super().__init__(cfg)

    def build_attn_bias(self) -> Tensor:
        # Block-causal: query of scale s sees keys of scales <= s (docs/var.md §2.4).
        return self.scale_mask(torch.ge)

    def forward(
        self, label_B: Tensor, x_BLCv: Tensor, scales: Iterable[int] | None = None
    ) -> Tensor:
        """Teacher forcing: logits of the tokens of ``scales`` (default: all, (B, L, V)),
        concatenated in scale order; logit t of the full pyramid predicts token t.

        ``x_BLCv`` is the teacher-forcing input (B, L − first_l, Cvae) from
        ``VQVAE.idx_to_teacher_input``. The signature is MVAR's; since a VAR scale sees every
        earlier one, asking for some scales runs the prefix 0..max(scales) and keeps their rows.
        """
        S = len(self.patch_nums)
        wanted = sorted(set(range(S) if scales is None else scales))
        if not wanted or not 0 <= wanted[0] <= wanted[-1] < S:
            raise ValueError(f"scales must be a non-empty subset of 0..{S - 1}, got {scales}")
        top = wanted[-1] + 1
        cond_BD = self.class_condition(label_B)
        x_BlC = self.embed_inputs(cond_BD, x_BLCv, range(top))
        l_top = self.begin_ends[top - 1][1]
        bias = self.attn_bias_for_masking
        if l_top < self.L:
            bias = bias[:, :, :l_top, :l_top]

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.dense_attention(q, k, v, bias)

        h_BlC = self.run_blocks(x_BlC, cond_BD, [attend] * len(self.blocks))
        logits = self.get_logits(h_BlC, cond_BD)
        if wanted != list(range(top)):
            logits = torch.cat([logits[:, slice(*self.begin_ends[si])] for si in wanted], dim=1)
        return logits

    def sampling_step(self) -> tuple[ScaleStep, Callable[[], int]]:
        """Each scale attends to itself and the cached keys/values of earlier scales (docs/var.md §3)."""
        cache = KVCache(len(self.blocks))

        def cached_attend(layer: int) -> AttendFn:
            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                k, v = cache.extend(layer, k, v)
                return self.dense_attention(q, k, v, None)  # earlier scales only: no mask

            return attend

        attends: Sequence[AttendFn] = [cached_attend(i) for i in range(len(self.blocks))]

        def step(si: int, x_BlC: Tensor, cond_BD: Tensor) -> Tensor:
            return self.run_blocks(x_BlC, cond_BD, attends)

        return step, cache.nbytes
