"""Checkpoint formats and the errors a user sees for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mvar.build import build_model, build_vqvae
from mvar.checkpoint import (
    CheckpointError,
    load_pretrained,
    load_transformer,
    load_vqvae,
    resolve_checkpoint,
)


@pytest.fixture(scope="module")
def var_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("var-tiny").state_dict()


@pytest.mark.parametrize(
    "layout",
    ["plain", "mvar_wo_ddp", "trainer.var_wo_ddp", "trainer.mvar_wo_ddp", "ddp-prefixed"],
)
@pytest.mark.parametrize("preset", ["var-tiny", "mvar-tiny"])
def test_every_official_layout_loads(
    tmp_path: Path, var_sd: dict, layout: str, preset: str
) -> None:
    wrapped: object = {
        "plain": var_sd,
        "mvar_wo_ddp": {"mvar_wo_ddp": var_sd, "args": "ignored"},
        "trainer.var_wo_ddp": {"trainer": {"var_wo_ddp": var_sd, "step": 3}},
        "trainer.mvar_wo_ddp": {"trainer": {"mvar_wo_ddp": var_sd}},
        "ddp-prefixed": {f"module.{k}": v for k, v in var_sd.items()},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = load_transformer(path, preset)
    got = model.state_dict()
    for k, v in var_sd.items():
        if k != "attn_bias_for_masking":  # rebuilt from the geometry, never loaded
            assert torch.equal(got[k], v), k
    expected_finite = 286_434 if preset.startswith("var") else 110_468
    assert torch.isfinite(got["attn_bias_for_masking"]).sum() == expected_finite


def test_wrong_shapes_name_keys_and_file(tmp_path: Path) -> None:
    path = tmp_path / "other-geometry.pth"
    torch.manual_seed(0)
    torch.save(build_model("var-tiny-512").state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path, "var-tiny")
    msg = str(e.value)
    assert str(path) in msg and "var-tiny" in msg
    assert "pos_1LC: expected (1, 680, 128), found (1, 2240, 64)" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path, var_sd: dict) -> None:
    sd = dict(var_sd)
    del sd["head.bias"]
    sd["blocks.9.attn.q_bias"] = torch.zeros(128)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path, "mvar-tiny")
    msg = str(e.value)
    assert "missing keys (1): head.bias" in msg
    assert "unexpected keys (1): blocks.9.attn.q_bias" in msg


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable torch.save file"):
        load_transformer(path, "var-tiny")
    other = tmp_path / "list.pth"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="holds no transformer state dict"):
        load_transformer(other, "var-tiny")


def test_truncated_file(tmp_path: Path, var_sd: dict) -> None:
    path = tmp_path / "var_d16.pth"
    torch.save(var_sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_transformer(path, "var-tiny")
    assert "truncated" in str(e.value) and str(path) in str(e.value)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module, not a state dict
    with pytest.raises(CheckpointError, match="refused \\(unpickling them could run code\\)") as e:
        load_transformer(path, "var-tiny")
    # torch's advice to load with weights_only=False (i.e. run the file's code) never reaches
    # the user.
    assert "weights_only" not in str(e.value) and "False" not in str(e.value)
    assert str(path) in str(e.value)


def test_missing_file_says_where_it_looked_and_where_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MVAR_CHECKPOINT_DIR", str(tmp_path / "ckpts"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint("mvar-finetune-d20.pth")
    msg = str(e.value)
    assert "'mvar-finetune-d20.pth'" in msg
    assert str(tmp_path / "ckpts" / "mvar-finetune-d20.pth") in msg
    assert "https://huggingface.co/CVLUESTC/MVAR/resolve/main/mvar-finetune-d20.pth" in msg
    with pytest.raises(FileNotFoundError, match="vae_ch160v4096z32.pth"):
        load_pretrained("var-d16", ckpt=None, vae_ckpt="vae_ch160v4096z32.pth")


def test_bare_names_are_found_in_checkpoint_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var_sd: dict
) -> None:
    d = tmp_path / "weights"
    d.mkdir()
    torch.save(var_sd, d / "var_tiny.pth")
    monkeypatch.setenv("MVAR_CHECKPOINT_DIR", str(d))
    assert resolve_checkpoint("var_tiny.pth") == d / "var_tiny.pth"


def test_vqvae_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = build_vqvae(build_model("var-tiny", device="meta").config.vae)
    path = tmp_path / "vae.pth"
    torch.save(vae.state_dict(), path)
    loaded = load_vqvae(path, "var-tiny")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit"):
        load_vqvae(_shrunk(tmp_path, vae), "var-tiny")


def _shrunk(tmp_path: Path, vae: torch.nn.Module) -> Path:
    sd = vae.state_dict()
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][:10]
    path = tmp_path / "vae_bad.pth"
    torch.save(sd, path)
    return path


def test_release_names_mean_one_thing() -> None:
    # One registry (mvar.config.RELEASES); a name is either an architecture or a set of weights,
    # never both unless the architecture has exactly that one release (var-d16 and var_d16.pth).
    from mvar.checkpoint import CHECKPOINT_FILES, DOWNLOADS
    from mvar.config import PRESETS, RELEASES, SAMPLING_PRESETS

    assert len({r.file for r in RELEASES.values()}) == len(RELEASES)
    for name, r in RELEASES.items():
        assert r.preset in PRESETS and CHECKPOINT_FILES[name] == r.file and r.file in DOWNLOADS
        assert SAMPLING_PRESETS[name] == r.sampling
        if name in PRESETS:
            assert r.preset == name and [x for x in RELEASES.values() if x.preset == name] == [r]
    # MVAR-d16 has two releases, so the architecture name is no release name.
    assert "mvar-d16" not in RELEASES
    assert RELEASES["mvar-scratch-d16"].file == "mvar-d16.pth"
    assert RELEASES["mvar-finetune-d16"].preset == RELEASES["mvar-scratch-d16"].preset == "mvar-d16"
