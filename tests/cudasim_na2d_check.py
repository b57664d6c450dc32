"""Check the numba.cuda kernels against the reference under numba's CUDA simulator.

Run as a separate process with ``NUMBA_ENABLE_CUDASIM=1`` (numba reads it at import), which is
what ``tests/test_attention.py::test_cuda_kernels_under_simulator`` does:

    NUMBA_ENABLE_CUDASIM=1 python tests/cudasim_na2d_check.py [--quick]

For each problem it runs ``forward_host`` and ``backward_host`` of ``mvar.attention.cuda`` and
compares out, lse, dq, dk and dv with the fp64 reference (autograd for the gradients), using the
fp32 rows of the tolerance table. Prints one JSON line per problem and exits 1 if any fails
(2 if the simulator is not active, so a misconfigured run cannot pass by testing nothing).
"""

from __future__ import annotations

import json
import os
import sys
import time

# The simulator runs each thread block as Python threads; a short switch interval makes the
# many syncthreads barriers cheap (2-4x faster, docs/neighbourhood_attention.md §6).
sys.setswitchinterval(1e-4)

import numpy as np
import torch

# (B, heads, H, W, D, kh, kw, scale, threads per block). Rectangular grids, odd and even
# kernels, k = side, a 1x1 grid, MVAR's 13x13 with k = 7. Most run with 8-thread blocks: the
# simulator's cost grows with threads per block, and with 8 threads every window (> 8 keys) goes
# through the chunked online-softmax path and every head dim > 8 through the strided loops.
# One runs with the production block (64 threads: the window in one chunk, D = 70 > 64 through
# the strided loop); the chunked path is the same code whatever the block size.
PROBLEMS: list[tuple[int, int, int, int, int, int, int, float, int]] = [
    (1, 2, 5, 4, 3, 3, 2, 0.7, 8),
    (2, 1, 6, 6, 9, 4, 4, 1.0, 8),
    (1, 1, 3, 7, 5, 3, 7, 0.5, 8),
    (1, 1, 1, 1, 4, 1, 1, 1.0, 8),
    (1, 1, 13, 13, 3, 7, 7, 1.0, 8),
    (1, 1, 3, 3, 70, 2, 3, 0.3, 64),
]
QUICK = PROBLEMS[:4]


def check(
    B: int, heads: int, H: int, W: int, D: int, kh: int, kw: int, scale: float, block: int
) -> dict:
    from mvar.attention import cuda as na_cuda
    from mvar.attention import reference
    from mvar.attention._common import tolerance

    gen = torch.Generator().manual_seed(1000 * H + 10 * W + D)
    q, k, v, g = (
        torch.randn(B, heads, H, W, D, generator=gen, dtype=torch.float64) for _ in range(4)
    )
    q32, k32, v32, g32 = (t.float().numpy() for t in (q, k, v, g))
    # the oracle runs on the same fp32-rounded inputs, in fp64
    qr, kr, vr = (torch.from_numpy(a).double().requires_grad_() for a in (q32, k32, v32))
    ref = reference.forward(qr, kr, vr, kh, kw, scale)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), torch.from_numpy(g32).double())
    # lse from its definition, on the scaled window scores
    idx = reference.window_key_index(H, W, kh, kw, torch.device("cpu"))
    qn = qr.detach().reshape(B, heads, H * W, D)
    kn = kr.detach().reshape(B, heads, H * W, D)[:, :, idx]
    ref_lse = torch.logsumexp(torch.einsum("bhnd,bhnkd->bhnk", qn, kn) * scale, -1)

    t0 = time.perf_counter()
    out, lse = na_cuda.forward_host(q32, k32, v32, (kh, kw), scale, block=block)
    grads = na_cuda.backward_host(q32, k32, v32, out, lse, g32, (kh, kw), scale, block=block)
    seconds = time.perf_counter() - t0

    tol_o, tol_g = tolerance(torch.float32, "out"), tolerance(torch.float32, "grad")
    errors: dict[str, float] = {}
    ok = True
    pairs = [("out", out, ref, tol_o), ("lse", lse, ref_lse.reshape(B, heads, H, W), tol_o)]
    pairs += [(n, a, r, tol_g) for n, a, r in zip(("dq", "dk", "dv"), grads, ref_grads)]
    for name, got, want, tol in pairs:
        want_np = want.detach().numpy()
        err = np.abs(got.astype(np.float64) - want_np)
        errors[name] = float(err.max())
        ok &= bool(np.all(err <= tol.atol + tol.rtol * np.abs(want_np)))
    return {
        "problem": [B, heads, H, W, D, kh, kw, scale, block],
        "ok": ok,
        "max_abs_err": errors,
        "seconds": round(seconds, 2),
    }


def main(argv: list[str]) -> int:
    import numba

    if not numba.config.ENABLE_CUDASIM:
        print(json.dumps({"error": "NUMBA_ENABLE_CUDASIM=1 is not set; nothing was checked"}))
        return 2
    failed = 0
    for problem in QUICK if "--quick" in argv else PROBLEMS:
        result = check(*problem)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # too late for numba if already imported
    sys.exit(main(sys.argv[1:]))
