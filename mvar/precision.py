"""Sampling precision: one definition of the names, the check and the autocast context.

``fp32`` is the default and the parity path: no autocast at all, so results stay bitwise equal
to a call without the option. ``bf16`` and ``fp16`` run the transformer blocks (and the VQ-VAE's
residual convolutions and decoder) under ``torch.autocast``, as the official samplers do: VAR's
demo and MVAR's ``run_mvar_demo.py`` wrap ``autoregressive_infer_cfg`` / ``autoregressive_infer``
*and* ``fhat_to_img`` in ``torch.autocast("cuda", dtype=torch.float16)``.

What stays fp32 under autocast (docs/precision.md):

- the class, position and level embeddings (``nn.Embedding`` and parameter adds: autocast does
  not touch them) and the residual stream, which is fp32 + autocast-dtype = fp32;
- the head's input and the logits: ``get_logits`` casts both with ``.float()`` as the official
  code does, while the head's two linears run in the autocast dtype as they do there (a
  stricter fp32 head would not be what the paper ran, and on a GPU the fp32 GEMM of the
  4096-way head costs a large share of an fp16 forward);
- the softmax / top-k / top-p / multinomial of sampling (they act on the fp32 logits);
- f̂, the cumulative latent: fp32 + autocast-dtype convolution output = fp32.

``fp16`` on the CPU is refused: the official code uses fp16 on GPUs only, CPUs without
AVX-512-FP16 emulate fp16 GEMMs (slower than fp32, nothing gained), and the project's CPU
precision is ``bf16`` (native on this class of CPU). An error says so rather than running a
setting nobody measured.
"""

from __future__ import annotations

import contextlib

import torch

#: The sampling precisions, default first.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
#: torch's own names, accepted as input (older settings files and ``--autocast float16``) and
#: normalised to the short name.
ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def check_precision(name: object, device: torch.device | str | None = None) -> str:
    """The canonical name (one of :data:`PRECISIONS`) of ``name``; raises ValueError with one
    line for an unknown name, or for ``fp16`` on a CPU ``device`` (see the module docstring).
    ``device=None`` checks the name only."""
    if isinstance(name, torch.dtype):
        name = {v: k for k, v in TORCH_DTYPES.items()}.get(name, str(name))
    canon = ALIASES.get(name, name) if isinstance(name, str) else name
    if canon not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    if canon == "fp16" and device is not None and torch.device(device).type == "cpu":
        raise ValueError(
            "precision fp16 runs on GPUs only (as the official samplers do); on the CPU use bf16"
        )
    return str(canon)


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a precision name (aliases accepted)."""
    return TORCH_DTYPES[check_precision(name)]


def autocast(dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; for ``fp32`` nothing at all (not
    even an ``enabled=False`` autocast), so the fp32 path is exactly the call without it."""
    canon = check_precision(dtype, device)
    if canon == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=TORCH_DTYPES[canon])


def describe(dtype: str) -> str:
    """How a result row's ``dtype`` column names a precision: ``float32`` without autocast,
    else ``float32+autocast(<torch dtype>)`` (weights stay fp32; autocast picks per op)."""
    canon = check_precision(dtype)
    if canon == "fp32":
        return "float32"
    return f"float32+autocast({str(TORCH_DTYPES[canon]).removeprefix('torch.')})"
