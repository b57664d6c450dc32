"""MVAR and its VAR baseline: scale-wise visual autoregression with scale- and spatial-Markov
conditioning (Zhang et al., ICLR 2026, arXiv 2505.12742).

Tensor-shape convention, used for every tensor name in the package (suffixes):

    B   batch (the doubled 2B batch when classifier-free guidance runs both halves)
    L   tokens of the whole scale pyramid, L = sum(pn**2) (680 at 256 px)
    l   tokens of one scale (pn**2)
    C   transformer width;  H heads;  c = C // H head dim
    V   codebook (vocabulary) size;  Cv  VQ-VAE latent channels (Cvae)
    S   number of scales;  pn  side of one scale's token map;  N = patch_nums[-1]

e.g. ``x_BLC`` is (B, L, C), ``logits_BlV`` is (B, pn*pn, V), ``f_BCvhw`` a latent map.
"""

from mvar.config import (
    ModelConfig,
    SamplingConfig,
    VQVAEConfig,
    get_preset,
    get_sampling_preset,
    list_presets,
)

__all__ = [
    "ModelConfig",
    "SamplingConfig",
    "VQVAEConfig",
    "get_preset",
    "get_sampling_preset",
    "list_presets",
]
__version__ = "0.1.0"
