"""Compile every numba.cuda neighbourhood-attention kernel to PTX with the real compiler (NVVM).

The simulator (tests/cudasim_na2d_check.py) runs the kernels as Python and checks no types;
this catches what only the compiler sees: untypeable code, fp64 creeping into the fp32 kernels
(a float64 literal or a libm call promotes the whole expression), register spills. No GPU is
needed, only the NVVM library (the ``numba-cuda[cu13]`` wheels). If ``ptxas`` is on the PATH
the register use of each kernel is reported (``-rP`` shows it) and spills fail the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

numba_cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from mvar.attention import cuda as na_cuda

# Hopper (H100/H200) and Ampere: the GPUs the project's CUDA runs target.
COMPUTE_CAPABILITIES = [(9, 0), (8, 0)]


def _nvvm_missing_reason() -> str | None:
    if na_cuda._IMPORT_ERROR is not None:
        return na_cuda._IMPORT_ERROR
    try:
        from numba.cuda.cudadrv import nvvm

        if not nvvm.is_available():
            return "libNVVM is not available (install numba-cuda[cu13] or [cu12])"
    except Exception as exc:  # noqa: BLE001  (the probe itself fails when wheels are missing)
        return f"probing libNVVM raised {type(exc).__name__}: {exc}"
    return None


pytestmark = pytest.mark.skipif(
    _nvvm_missing_reason() is not None, reason=f"cannot compile PTX: {_nvvm_missing_reason()}"
)

# fp64 arithmetic instructions; the kernels must have none (fp32 everywhere).
F64_ARITH = re.compile(r"\b(?:add|sub|mul|fma|div|ex2|lg2|rcp|sqrt|max|min)(?:\.\w+)*\.f64\b")


@pytest.fixture(scope="module")
def ptx_by_kernel() -> dict[tuple[str, tuple[int, int]], str]:
    out = {}
    for name, (fn, sig) in na_cuda.kernels_for_ptx().items():
        for cc in COMPUTE_CAPABILITIES:
            ptx, _ = numba_cuda.compile_ptx(fn, sig, cc=cc)
            out[(name, cc)] = ptx
    return out


def test_every_kernel_compiles_to_ptx(ptx_by_kernel: dict) -> None:
    names = set(na_cuda.kernels_for_ptx())
    assert names == {"forward", "backward_dq", "backward_dkdv"}
    for (name, cc), ptx in ptx_by_kernel.items():
        assert ".entry" in ptx, f"{name} at sm_{cc[0]}{cc[1]}: no kernel entry in the PTX"
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        assert "bar.sync" in ptx, f"{name}: the block barriers are missing"


def test_kernels_compute_in_fp32_only(ptx_by_kernel: dict) -> None:
    for (name, cc), ptx in ptx_by_kernel.items():
        found = sorted(set(F64_ARITH.findall(ptx)))
        assert not found, f"{name} (sm_{cc[0]}{cc[1]}) has fp64 arithmetic: {found}"


def test_register_use_and_no_spills(ptx_by_kernel: dict, tmp_path) -> None:
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas is not on the PATH: register use not reported (PTX compiled fine)")
    for (name, (major, minor)), ptx in ptx_by_kernel.items():
        src = tmp_path / f"{name}_{major}{minor}.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, f"-arch=sm_{major}{minor}", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        print(
            f"{name} sm_{major}{minor}: {regs.group(1) if regs else '?'} registers, spills {spills}"
        )
        assert not any(spills), f"{name} spills registers:\n{log}"
