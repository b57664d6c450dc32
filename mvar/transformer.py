"""The scale-wise autoregressive transformer VAR (``baselines/var.py``) and MVAR
(``mvar/model.py``) both subclass: embeddings, the AdaLN blocks of ``mvar.blocks``, the head,
the attention mask buffer, sampling and initialisation (docs/var.md §2).

A subclass only says which keys each query sees: ``build_attn_bias`` (the mask buffer),
``forward(label_B, x_BLCv, scales=None)`` (teacher forcing, the same signature for both) and
``sampling_step`` (one scale's forward while sampling). Parameters and buffers are registered in
the official order so the official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mvar import precision
from mvar.blocks import AdaLNBeforeHead, AdaLNSelfAttn, AttendFn, DenseAttention, SharedAdaLin
from mvar.config import ModelConfig
from mvar.sampling import SampleOutput, ScaleStep, decode_fhat, sample_scales

# ---------------------------------------------------------------------------------------------


def scale_ids(patch_nums: Sequence[int]) -> Tensor:
    """(L,) int64: the scale index of every token of the pyramid."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])


class ScaleARTransformer(nn.Module):
    """What VAR and MVAR share. Subclasses set the attention pattern: they implement
    ``build_attn_bias`` (the ``attn_bias_for_masking`` buffer, rebuilt from the geometry on
    every load — a checkpoint's copy is never trusted, docs/mvar.md §3), ``forward`` (teacher
    forcing) and ``sampling_step`` (one scale's forward while sampling).
    """

    #: Whether ``guidance == 1.0`` still runs the unconditional half (VAR) or disables guidance
    #: altogether (MVAR). The official samplers differ here; see ``mvar.sampling``.
    GUIDANCE_ONE_RUNS_UNCONDITIONAL: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        self.C, self.L, self.V, self.Cvae = C, L, cfg.vocab_size, cfg.Cvae
        self.num_classes = cfg.num_classes
        self.patch_nums = tuple(cfg.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = cfg.begin_ends
        self.cond_drop_rate = 0.1  # class dropout for CFG, training only (docs/var.md §4)

        # Registration order reproduces the official state-dict order.
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # + the null class for CFG
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        if cfg.shared_aln:
            self.shared_ada_lin: nn.Module = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        else:
            self.shared_ada_lin = nn.Identity()
        # Stochastic depth grows linearly over the blocks (docs/var.md §2); plain floats so that
        # building on the meta device works.
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, dpr[i]) for i in range(cfg.depth))
        self.register_buffer("lvl_1L", scale_ids(self.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", self.build_attn_bias())
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        softmax_scale = self.blocks[0].attn.softmax_scale if cfg.depth else 1.0
        self.dense_attention = DenseAttention(softmax_scale)
        self.register_load_state_dict_post_hook(ScaleARTransformer._rebuild_mask)

    def forward(
        self, label_B: Tensor, x_BLCv: Tensor, scales: Iterable[int] | None = None
    ) -> Tensor:
        """Teacher forcing: logits (B, Σ pn², V) of the tokens of ``scales`` (default all), in
        scale order, from the full teacher-forcing input ``x_BLCv`` (B, L − first_l, Cvae)."""
        raise NotImplementedError

    # -- masks ------------------------------------------------------------------------------
    def build_attn_bias(self) -> Tensor:  # (1, 1, L, L) additive 0 / -inf
        raise NotImplementedError

    def scale_mask(self, sees: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(1, 1, L, L) additive mask: 0 where ``sees(query scale, key scale)``, else -inf."""
        d = scale_ids(self.patch_nums)
        bias = torch.where(sees(d.view(-1, 1), d.view(1, -1)), 0.0, -torch.inf)
        return bias.view(1, 1, self.L, self.L)

    @staticmethod
    def _rebuild_mask(module: nn.Module, incompatible: Any) -> None:
        # The mask is a function of the geometry; a loaded copy can be wrong (the official
        # MVAR fine-tunes inherited VAR's block-causal one, docs/mvar.md §3). The key stays in the
        # state dict (so VAR and MVAR files stay interchangeable) but its values are replaced
        # after every load; a shape mismatch still fails the load, since it means another
        # geometry.
        assert isinstance(module, ScaleARTransformer)
        if module.attn_bias_for_masking.device.type != "meta":
            with torch.no_grad():
                module.attn_bias_for_masking.copy_(module.build_attn_bias())

    # -- embeddings and head ----------------------------------------------------------------
    def class_condition(self, label_B: Tensor) -> Tensor:
        """cond_BD = class_emb[label] with the official 10% null-class dropout in training
        only (the official forward also drops labels in eval mode; we do not)."""
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(label_B.shape[0], device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        return self.class_emb(label_B)

    def lvl_pos(self) -> Tensor:
        """(1, L, C) level + absolute position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def embed_scale(
        self, si: int, cond_BD: Tensor, x_BlCv: Tensor | None, lvl_pos: Tensor | None = None
    ) -> Tensor:
        """Token embeddings of scale ``si``: the start tokens (class embedding + pos_start) for
        si = 0, else word_embed of the scale's input ``x_BlCv`` (B, pn², Cvae), the area-down
        of the cumulative f̂ (docs/var.md §1); plus the level and position embedding."""
        lvl_pos = self.lvl_pos() if lvl_pos is None else lvl_pos
        bg, ed = self.begin_ends[si]
        if si == 0:
            x = cond_BD.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start
        else:
            assert x_BlCv is not None
            x = self.word_embed(x_BlCv.float())
        return x + lvl_pos[:, bg:ed]

    def embed_inputs(self, cond_BD: Tensor, x_BLCv: Tensor, scales: Sequence[int]) -> Tensor:
        """Token embeddings of the listed scales, concatenated (teacher forcing)."""
        lvl_pos = self.lvl_pos()
        parts = []
        for si in scales:
            bg, ed = self.begin_ends[si]
            # x_BLCv holds L - first_l rows: token t of the pyramid sits at row t - first_l.
            x = None if si == 0 else x_BLCv[:, bg - self.first_l : ed - self.first_l]
            parts.append(self.embed_scale(si, cond_BD, x, lvl_pos))
        return torch.cat(parts, dim=1)

    def get_logits(self, h_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        # As the official get_logits: the input and the logits are cast to fp32, but the head's
        # linears run in the autocast dtype when there is one (docs/precision.md). Keeping them
        # in fp32 would be slightly more exact but is not what the paper ran, and on a GPU an
        # fp32 GEMM of the 4096-way head costs a large share of an fp16 forward.
        return self.head(self.head_nm(h_BlC.float(), cond_BD).float()).float()

    def run_blocks(self, x_BlC: Tensor, cond_BD: Tensor, attends: Sequence[AttendFn]) -> Tensor:
        cond = self.shared_ada_lin(cond_BD)
        for block, attend in zip(self.blocks, attends, strict=True):
            x_BlC = block(x_BlC, cond, attend)
        return x_BlC

    # -- sampling ---------------------------------------------------------------------------
    def sampling_step(self) -> tuple[ScaleStep, Callable[[], int]]:
        """For one sampling call: the forward of one scale's tokens, and a function that gives
        the bytes of KV cache held at the end (0 without a cache)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        vae: nn.Module,
        label_B: Tensor,
        *,
        guidance: float | None = None,
        cfg: float | None = None,
        top_k: int = 0,
        top_p: float = 0.0,
        g_seed: int | None = None,
        more_smooth: bool = False,
        decode: bool = True,
        record_logits: bool = False,
        dtype: str = precision.DEFAULT_PRECISION,
    ) -> SampleOutput:
        """Sample B images of classes ``label_B`` (docs/var.md §3, docs/mvar.md §5).

        ``guidance`` is the classifier-free guidance scale (default 1.5); ``cfg=`` is accepted as
        an alias, the official samplers' keyword (giving both is an error). At ``guidance == 1.0``
        the unconditional half still runs when ``GUIDANCE_ONE_RUNS_UNCONDITIONAL`` (VAR);
        otherwise only the conditional rows run, with no guidance (MVAR), as in the official
        samplers.

        ``dtype`` (``mvar.precision.PRECISIONS``): ``fp32`` runs without autocast (the parity
        path); ``bf16`` / ``fp16`` run token generation and the decode under autocast, as the
        official samplers do, with the logits head in fp32; ``img01`` is returned in fp32."""
        if guidance is not None and cfg is not None:
            raise ValueError("give the guidance scale once: guidance= or its alias cfg=")
        guidance = guidance if guidance is not None else cfg if cfg is not None else 1.5
        dtype = precision.check_precision(dtype, label_B.device)
        step, kv_cache_bytes = self.sampling_step()
        with precision.autocast(dtype, label_B.device):
            out = sample_scales(
                self, vae, label_B, step,
                guided=self.GUIDANCE_ONE_RUNS_UNCONDITIONAL or guidance != 1.0,
                guidance=guidance, top_k=top_k, top_p=top_p, g_seed=g_seed,
                more_smooth=more_smooth, record_logits=record_logits,
            )  # fmt: skip
        out.kv_cache_bytes = kv_cache_bytes()
        # Free the KV cache (held by ``step``'s closures) before the decoder allocates its
        # activations, as the official samplers do: decoding next to a live cache was slower
        # (issue 13). Nothing else refers to it.
        del step, kv_cache_bytes
        if decode:
            with precision.autocast(dtype, label_B.device):  # the official samplers decode under it too
                out.img01 = decode_fhat(vae, out.fhat).float()
        return out

    # -- initialisation (training from scratch; docs/var.md §2.7) --------------------
    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02
    ) -> None:
        if self.pos_1LC.device.type == "meta":
            return
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        depth = len(self.blocks)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if not block.shared_aln:
                w = block.ada_lin[-1].weight
                w[2 * self.C :].mul_(init_adaln)
                w[: 2 * self.C].mul_(init_adaln_gamma)
            if block.attn.attn_l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
