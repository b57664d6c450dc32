"""Frozen configs and named presets for the VQ-VAE, VAR and MVAR.

Every constant here is the official code's (FoundationVision/VAR @ 78b9539, CVL-UESTC/MVAR @
d0e035a); see ``docs/var.md`` and ``docs/mvar.md``. Presets are looked up by exact name and
an unknown name raises, listing the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

PATCH_NUMS_256: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # docs/var.md §0, 680 tokens
PATCH_NUMS_512: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # VAR-d36-s, 2240 tokens


@dataclass(frozen=True)
class PyramidGeometry:
    """Token layout of the scale pyramid (the one definition): scale ``si`` holds tokens
    ``begin_ends[si]``, row-major on a ``patch_nums[si]``² grid."""

    patch_nums: tuple[int, ...]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def side(self) -> int:
        return max(self.patch_nums)

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return tuple(out)


@dataclass(frozen=True)
class VQVAEConfig:
    """The multi-scale residual VQ-VAE (``vae_ch160v4096z32.pth`` by default)."""

    vocab_size: int = 4096
    Cvae: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4  # K shared phi convs (docs/var.md §1)
    quant_resi: float = 0.5  # phi(h) = (1 - q) h + q conv(h)
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


Arch = Literal["var", "mvar"]


@dataclass(frozen=True)
class ModelConfig:
    """One scale-wise AR transformer: VAR (block-causal, KV cache) or MVAR (block-diagonal
    scales, neighbourhood attention on scales >= ``refine_step``)."""

    name: str
    arch: Arch
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # MVAR only (docs/mvar.md §2): 2-D neighbourhood attention on scales si >= refine_step. With
    # ``spatial_markov=False`` the model is the ablation's "(b) + scale-Markov prediction".
    kernel_size: int = 7
    refine_step: int = 8
    spatial_markov: bool = True
    vae: VQVAEConfig = field(default_factory=VQVAEConfig)

    def __post_init__(self) -> None:
        if self.arch not in ("var", "mvar"):
            raise ValueError(f"arch must be 'var' or 'mvar', got {self.arch!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        for si, pn in enumerate(self.patch_nums):
            if self.uses_neighbourhood(si) and self.kernel_size > pn:
                raise ValueError(
                    f"neighbourhood kernel {self.kernel_size} is larger than the {pn}x{pn} "
                    f"token map of scale {si} (refine_step {self.refine_step}); expected "
                    f"kernel_size <= {pn} or a larger refine_step"
                )

    # Geometry, derived from the VQ-VAE so nothing hard-codes 256 px / 680 tokens / 10 scales.
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.vae.patch_nums

    @property
    def vocab_size(self) -> int:
        return self.vae.vocab_size

    @property
    def Cvae(self) -> int:
        return self.vae.Cvae

    @property
    def geometry(self) -> PyramidGeometry:
        return PyramidGeometry(tuple(self.patch_nums))

    @property
    def num_scales(self) -> int:
        return self.geometry.num_scales

    @property
    def seq_len(self) -> int:
        return self.geometry.seq_len

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        return self.geometry.begin_ends

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def uses_neighbourhood(self, si: int) -> bool:
        """Whether scale ``si`` uses 2-D neighbourhood attention (docs/mvar.md §2)."""
        return self.arch == "mvar" and self.spatial_markov and si >= self.refine_step

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings. ``top_k=0`` and ``top_p=0`` mean off (official semantics)."""

    guidance: float = 1.5  # classifier-free guidance scale (the official keyword is ``cfg``)
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False  # pictures only, never for FID (docs/var.md §3)


def _transformer(name: str, arch: Arch, depth: int, vae: VQVAEConfig, **kw: object) -> ModelConfig:
    # docs/var.md §2: width 64*depth, heads = depth, drop-path 0.1*depth/24.
    return ModelConfig(
        name=name,
        arch=arch,
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        vae=vae,
        **kw,  # type: ignore[arg-type]
    )


# The tiny presets are the embedded study's models (``repro.embedded``, docs/embedded.md):
# 32 px images over the paper's ten-scale pyramid 1..16 (so MVAR's neighbourhood attention
# runs on 13x13 and 16x16 exactly as at 256 px), a VQ-VAE that downsamples 2x with a
# 256-code codebook of 16-d codes, and the 10 classes of the generated shapes data set
# (``mvar.data.SyntheticShapes``). Small enough to train every stage on a 2-core CPU in minutes.
TINY_VAE = VQVAEConfig(vocab_size=256, Cvae=16, ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_CLASSES = 10


def _build_presets() -> dict[str, ModelConfig]:
    paper = VQVAEConfig()
    presets: dict[str, ModelConfig] = {}
    for d in (16, 20, 24, 30):
        presets[f"var-d{d}"] = _transformer(f"var-d{d}", "var", d, paper)
    for d in (16, 20, 24):
        presets[f"mvar-d{d}"] = _transformer(f"mvar-d{d}", "mvar", d, paper)
    # Ablation (b): block-diagonal scales, full attention within every scale.
    for d in (16, 20, 24):
        presets[f"mvar-d{d}-scale-markov"] = _transformer(
            f"mvar-d{d}-scale-markov", "mvar", d, paper, spatial_markov=False
        )
    # Tiny CPU presets (the embedded study): depth 2, width 128, 2 heads of 64 (the head
    # size of every paper preset, so the NA kernels run their D = 64 path).
    for arch in ("var", "mvar"):
        presets[f"{arch}-tiny"] = ModelConfig(
            name=f"{arch}-tiny", arch=arch, depth=2, embed_dim=128, num_heads=2,
            num_classes=TINY_CLASSES, vae=TINY_VAE,
        )  # fmt: skip
    presets["mvar-tiny-scale-markov"] = presets["mvar-tiny"].replace(
        name="mvar-tiny-scale-markov", spatial_markov=False
    )
    # A 512 px geometry at toy width, to show nothing hard-codes 256 px.
    for arch in ("var", "mvar"):
        presets[f"{arch}-tiny-512"] = ModelConfig(
            name=f"{arch}-tiny-512",
            arch=arch,
            depth=2,
            embed_dim=64,
            num_heads=2,
            vae=VQVAEConfig(vocab_size=512, ch=32, patch_nums=PATCH_NUMS_512),
        )
    return presets


PRESETS: dict[str, ModelConfig] = _build_presets()

# Tokenizer presets (``mvar.train_vae``): the embedded study's and the paper's geometry.
VAE_PRESETS: dict[str, VQVAEConfig] = {
    "vae-tiny": TINY_VAE,
    "vae-paper": VQVAEConfig(),  # vae_ch160v4096z32.pth
    # CI size: 16 px, four scales, 32 codes (tests and smoke runs of the trainer, seconds).
    "vae-micro": VQVAEConfig(
        vocab_size=32, Cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4, 8)
    ),
}

@dataclass(frozen=True)
class Release:
    """One released transformer checkpoint: the one registry every command and report reads.

    Names say one thing each: ``preset`` is an architecture (``mvar-d16``), ``name`` a set of
    released weights. MVAR released two d16 weights, so the from-scratch one is called
    ``mvar-scratch-d16`` here (its file is still the official ``mvar-d16.pth``) and the
    fine-tuned one ``mvar-finetune-d16`` (MVAR-d16† of the paper's Table 2).
    """

    name: str
    file: str  # the official file name (download addresses: ``mvar.checkpoint.DOWNLOADS``)
    preset: str  # the architecture (a key of ``PRESETS``)
    sampling: SamplingConfig  # the official sampling settings (docs/mvar.md §5, docs/var.md §3.6)
    description: str


def _releases() -> dict[str, Release]:
    var = SamplingConfig(1.5, 900, 0.96)  # FoundationVision/VAR README, every depth
    out = [Release(f"var-d{d}", f"var_d{d}.pth", f"var-d{d}", var, f"VAR-d{d}, official weights")
           for d in (16, 20, 24, 30)]  # fmt: skip
    out.append(Release("mvar-scratch-d16", "mvar-d16.pth", "mvar-d16", SamplingConfig(2.7, 1200, 0.99),
                       "MVAR-d16 trained from scratch (the paper's Table 1 row)"))  # fmt: skip
    for d, s in ((16, SamplingConfig(2.0, 1200, 0.99)), (20, SamplingConfig(1.5, 900, 0.96)),
                 (24, SamplingConfig(1.4, 900, 0.96))):  # fmt: skip
        out.append(Release(f"mvar-finetune-d{d}", f"mvar-finetune-d{d}.pth", f"mvar-d{d}", s,
                           f"MVAR-d{d}† fine-tuned from VAR-d{d} (the paper's Table 2)"))  # fmt: skip
    return {r.name: r for r in out}


RELEASES: dict[str, Release] = _releases()
#: Views of :data:`RELEASES` (not second definitions): official sampling settings and the
#: architecture preset of each released checkpoint name.
SAMPLING_PRESETS: dict[str, SamplingConfig] = {n: r.sampling for n, r in RELEASES.items()}
CHECKPOINT_PRESETS: dict[str, str] = {n: r.preset for n, r in RELEASES.items()}


def sampling_for(model: str, guidance: float | None, top_k: int | None, top_p: float | None,
                 more_smooth: bool = False) -> SamplingConfig:  # fmt: skip
    """Official settings for a released checkpoint name, else VAR's FID defaults (docs/var.md §3);
    explicit values override either."""
    base = SAMPLING_PRESETS.get(model, SamplingConfig())
    return SamplingConfig(
        guidance=base.guidance if guidance is None else guidance,
        top_k=base.top_k if top_k is None else top_k,
        top_p=base.top_p if top_p is None else top_p,
        more_smooth=more_smooth,
    )


def _unknown(kind: str, name: str, valid: object) -> KeyError:
    return KeyError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")  # type: ignore[arg-type]


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The model config of an exact preset name (``var-d16``, ``mvar-d24``, ``mvar-tiny``...)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise _unknown("model preset", name, PRESETS) from None


def get_vae_preset(name: str) -> VQVAEConfig:
    """The VQ-VAE config of an exact tokenizer preset name (``vae-tiny``, ``vae-paper``)."""
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise _unknown("VQ-VAE preset", name, VAE_PRESETS) from None


def get_sampling_preset(name: str) -> SamplingConfig:
    """Official sampling settings of a released checkpoint (``mvar-finetune-d20``...)."""
    try:
        return SAMPLING_PRESETS[name]
    except KeyError:
        raise _unknown("sampling preset", name, SAMPLING_PRESETS) from None
