"""The sampling precision option (``mvar.precision``, docs/precision.md): names and errors, what
runs in which dtype under bf16 (every linear bf16, the logits fp32), fp32 bitwise
equal to the call without the option, bf16 logits within the measured tolerance, sampled-token
agreement reported, and the option reaching generation's folder key."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from mvar import precision
from mvar.build import build_model

log = logging.getLogger(__name__)

# bf16 vs fp32 teacher-forcing logits: the largest max |err| measured over the parity fixture's
# scales was 5.0e-3 (reports/precision/logits_tolerance.csv), mean 7.6e-4; 2x margin for other
# CPUs' bf16 kernels.
BF16_LOGITS_MAX_ABS = 1e-2
BF16_LOGITS_MEAN_ABS = 1.5e-3


def test_names_and_errors() -> None:
    assert precision.PRECISIONS == ("fp32", "bf16", "fp16")
    assert precision.check_precision("bfloat16") == "bf16"  # torch's names are aliases
    assert precision.check_precision(torch.float16, "cuda") == "fp16"
    assert precision.check_precision("fp16") == "fp16"  # no device: the name only
    with pytest.raises(ValueError, match="unknown precision 'fp8'; expected one of fp32, bf16"):
        precision.check_precision("fp8")
    with pytest.raises(ValueError, match="GPUs only.*use bf16"):
        precision.check_precision("fp16", "cpu")
    assert precision.describe("fp32") == "float32"
    assert precision.describe("bf16") == "float32+autocast(bfloat16)"
    assert isinstance(precision.autocast("fp32", "cpu"), type(__import__("contextlib").nullcontext()))


def _linear_output_dtypes(model: nn.Module, run) -> dict[str, set[torch.dtype]]:  # type: ignore[no-untyped-def]
    seen: dict[str, set[torch.dtype]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, set()).add(o.dtype))
        for n, m in model.named_modules() if isinstance(m, nn.Linear)
    ]  # fmt: skip
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("preset", ["var-tiny", "mvar-tiny"])
def test_bf16_reaches_the_blocks_and_the_logits_are_fp32(preset: str, tiny_vae: nn.Module) -> None:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    label = torch.tensor([1, 2])
    seen = _linear_output_dtypes(model, lambda: model.sample(tiny_vae, label, g_seed=0,
                                                             decode=False, dtype="bf16"))  # fmt: skip
    block_linears = {n for n in seen if n.startswith("blocks.")}
    # every linear of every block ran: mat_qkv is called through F.linear (no hook), proj,
    # fc1, fc2, ada_lin[1] through their modules
    assert {n.split(".", 2)[2] for n in block_linears} == {"attn.proj", "ffn.fc1", "ffn.fc2", "ada_lin.1"}
    assert all(seen[n] == {torch.bfloat16} for n in block_linears), seen
    assert seen["word_embed"] == {torch.bfloat16}  # as under the official samplers' autocast
    # the head's linears run in the autocast dtype, as the official get_logits under autocast;
    # the logits the sampler sees are fp32 (recorded below)
    assert seen["head"] == {torch.bfloat16} and seen["head_nm.ada_lin.1"] == {torch.bfloat16}
    out = model.sample(tiny_vae, label, g_seed=0, decode=False, dtype="bf16", record_logits=True)
    assert out.guided_logits is not None and all(t.dtype == torch.float32 for t in out.guided_logits)
    # fp32: nothing runs in another dtype
    seen32 = _linear_output_dtypes(model, lambda: model.sample(tiny_vae, label, g_seed=0,
                                                               decode=False, dtype="fp32"))  # fmt: skip
    assert all(d == {torch.float32} for d in seen32.values())


def test_bf16_qkv_and_attention_inputs_are_bf16(tiny_vae: nn.Module) -> None:
    """mat_qkv runs through F.linear, so check the attention cores' inputs: SDPA and na2d see
    the autocast dtype (the official MVAR casts q, k, v to qkv's dtype before NATTEN)."""
    torch.manual_seed(0)
    model = build_model("mvar-tiny").eval()
    seen: dict[str, set[torch.dtype]] = {}
    na = model.neighbourhood_attention
    hook = na.register_forward_hook(lambda m, i, o: seen.setdefault("na_out", set()).add(o.dtype))
    try:
        model.sample(tiny_vae, torch.tensor([3]), g_seed=0, decode=False, dtype="bf16")
    finally:
        hook.remove()
    assert seen["na_out"] == {torch.bfloat16}


@pytest.mark.parametrize("preset", ["var-tiny", "mvar-tiny"])
def test_fp32_option_is_bitwise_the_call_without_it(preset: str, tiny_vae: nn.Module) -> None:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    label = torch.tensor([4, 5])
    a = model.sample(tiny_vae, label, g_seed=3, record_logits=True)
    b = model.sample(tiny_vae, label, g_seed=3, record_logits=True, dtype="fp32")
    assert a.guided_logits is not None and b.guided_logits is not None
    assert all(torch.equal(x, y) for x, y in zip(a.guided_logits, b.guided_logits, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.idx_Bl, b.idx_Bl, strict=True))
    assert a.img01 is not None and b.img01 is not None and torch.equal(a.img01, b.img01)
    c = model.sample(tiny_vae, label, g_seed=3, dtype="bf16")
    assert c.img01 is not None and c.img01.dtype == torch.float32  # returned in fp32
    with pytest.raises(ValueError, match="fp16 runs on GPUs only"):
        model.sample(tiny_vae, label, dtype="fp16")


@pytest.mark.parametrize("arch", ["var", "mvar"])
def test_bf16_logits_within_measured_tolerance(parity_models: list[tuple], arch: str) -> None:
    """Teacher forcing on the parity fixtures: bf16 within the stated tolerance of fp32, and
    the sampled-token agreement with fp32 reported (not asserted to be 100 %)."""
    from repro.precision import sampled_tokens, teacher_logits

    for fx, vae, models in parity_models:
        model, label, x = models[arch], fx["inputs"]["label"], fx["vae"]["teacher_input"]
        ref = teacher_logits(model, label, x, "fp32")
        got = teacher_logits(model, label, x, "bf16")
        assert not torch.equal(ref, got)  # bf16 did run
        err = (got - ref).abs()
        assert err.max().item() <= BF16_LOGITS_MAX_ABS, f"{arch}: max |err| {err.max().item():.3g}"
        assert err.mean().item() <= BF16_LOGITS_MEAN_ABS, f"{arch}: mean |err| {err.mean().item():.3g}"
        t32, t16 = sampled_tokens(model, vae, label, "fp32"), sampled_tokens(model, vae, label, "bf16")
        agree = sum(int((a == b).sum()) for a, b in zip(t32, t16)) / sum(a.numel() for a in t32)
        log.info("%s %s: bf16 logits max |err| %.3g, mean %.3g; token agreement %.4f",
                 fx["_path"], arch, err.max().item(), err.mean().item(), agree)  # fmt: skip
        assert 0.5 < agree <= 1.0  # near, not necessarily equal


def test_generation_folder_is_keyed_by_precision() -> None:
    from mvar.generate import GenerationSettings

    base = GenerationSettings(model="mvar-tiny", checkpoint="c", guidance=1.5, top_k=0, top_p=0.0,
                              per_class=1, classes=(0,), batch_size=1)  # fmt: skip
    assert base.dtype == "fp32"
    bf = dataclasses.replace(base, dtype="bf16")
    assert bf.folder_name() != base.folder_name() and bf.content_key() != base.content_key()
    assert dataclasses.replace(base, dtype="bfloat16") == bf  # alias: the same folder
    with pytest.raises(ValueError, match="fp16 runs on GPUs only"):
        dataclasses.replace(base, dtype="fp16")  # device defaults to cpu
    assert dataclasses.replace(base, dtype="fp16", device="cuda").dtype == "fp16"


def test_cli_refuses_fp16_on_cpu_in_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mvar.cli import run_command
    from mvar.generate import main

    args = ["--model", "mvar-tiny", "--num-classes", "1", "--per-class", "1", "--device", "cpu",
            "--dtype", "fp16", "--out-dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run_command(main, "generate", args)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 runs on GPUs only" in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_study_dtype_is_in_the_config_and_checked() -> None:
    from repro import embedded

    mini = embedded.get_study("miniature")
    assert mini.dtype == "fp32"
    bf = embedded.with_dtype(mini, "bf16", torch.device("cpu"))
    assert bf.dtype == "bf16" and bf.to_json()["dtype"] == "bf16"
    with pytest.raises(ValueError, match="GPUs only"):
        embedded.with_dtype(mini, "fp16", torch.device("cpu"))
    assert embedded.with_dtype(mini, None, torch.device("cpu")) is mini


@pytest.mark.parametrize("backend", ["dense", "flex", "numba"])
def test_neighbourhood_attention_takes_cpu_autocast_inputs(backend: str) -> None:
    """Under CPU bf16 autocast the block hands NA a fp32 q (the temperature is an fp32
    parameter) and bf16 k, v; every CPU backend gets them as one dtype (bf16, as the official
    MVAR casts to qkv's dtype) and returns bf16 within the bf16 row of the na2d tolerance table
    against the fp64 reference on the same rounded inputs."""
    from mvar.attention import backend_unavailable_reason, na2d, tolerance
    from mvar.blocks import NeighbourhoodAttention

    reason = backend_unavailable_reason(backend, "cpu", torch.bfloat16)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    g = torch.Generator().manual_seed(0)
    B, H, h, w, c = 2, 2, 13, 13, 16
    q, k, v = (torch.randn(B, H, h * w, c, generator=g) for _ in range(3))
    k, v = k.bfloat16(), v.bfloat16()
    na = NeighbourhoodAttention(7, 1.0, backend=backend)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = na(q, k, v, (h, w))
    assert out.dtype == torch.bfloat16
    ref = na2d(*(t.bfloat16().double().reshape(B, H, h, w, c) for t in (q, k, v)), 7, scale=1.0,
               backend="reference").reshape(B, H, h * w, c)  # fmt: skip
    tol = tolerance(torch.bfloat16)
    torch.testing.assert_close(out.double(), ref, atol=tol.atol, rtol=tol.rtol)
