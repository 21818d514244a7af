"""The D3SR weight file: round trip, atomic writes, and a clear error for every bad file."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from d3sr_core.weight_format import (
    EMBEDDING_KEY,
    D3SRWeights,
    WeightFileError,
    read_weights,
    write_weights,
)


def small_weights(**kw) -> D3SRWeights:
    lora = {"diffusion_model.input_blocks.1.1.proj_in": (torch.randn(4, 320), torch.randn(320, 4), 4.0),
            "diffusion_model.input_blocks.0.0": (torch.randn(4, 4, 3, 3), torch.randn(320, 4, 1, 1), 4.0)}
    args = dict(lora=lora, text_embedding=torch.randn(1, 77, 1024), timestep=321, lora_rank=4,
                lora_alpha=4.0, training={"steps": 7})
    args.update(kw)
    return D3SRWeights(**args)


def test_round_trip(tmp_path):
    w = small_weights()
    path = str(tmp_path / "w.safetensors")
    write_weights(path, w)
    r = read_weights(path)
    assert (r.timestep, r.lora_rank, r.lora_alpha, r.scale, r.training) == (321, 4, 4.0, 4.0, {"steps": 7})
    assert torch.equal(r.text_embedding, w.text_embedding)
    for name, (a, b, alpha) in w.lora.items():
        ra, rb, ralpha = r.lora[name]
        assert torch.equal(ra, a) and torch.equal(rb, b) and ralpha == alpha
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_keys_follow_comfyui_lora_naming(tmp_path):
    path = str(tmp_path / "w.safetensors")
    write_weights(path, small_weights())
    keys = set(load_file(path))
    assert "diffusion_model.input_blocks.1.1.proj_in.lora_A.weight" in keys
    assert "diffusion_model.input_blocks.1.1.proj_in.lora_B.weight" in keys
    assert "diffusion_model.input_blocks.1.1.proj_in.alpha" in keys
    assert EMBEDDING_KEY in keys


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "w.safetensors")
    write_weights(path, small_weights(timestep=100))
    import d3sr_core.weight_format as wf

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(wf, "save_file", broken)
    with pytest.raises(OSError):
        write_weights(path, small_weights(timestep=200))
    assert read_weights(path).timestep == 100
    assert os.listdir(tmp_path) == ["w.safetensors"]


def _rewrite(path, tensors=None, meta_update=None, drop=()):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    t.update(tensors or {})
    for k in drop:
        t.pop(k, None)
    meta.update(meta_update or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(t, path, metadata=meta)


@pytest.fixture
def good(tmp_path):
    path = str(tmp_path / "good.safetensors")
    write_weights(path, small_weights())
    return path


@pytest.mark.parametrize("change,expected", [
    (dict(meta_update={"format": None}), "not a D3SR file"),
    (dict(meta_update={"format_version": "2"}), "Update the D3SR node pack"),
    (dict(meta_update={"timestep": "1000"}), "outside 1..999"),
    (dict(meta_update={"timestep": "abc"}), "not an integer"),
    (dict(meta_update={"base_model": "sdxl"}), "Stable Diffusion 2.1-base"),
    (dict(meta_update={"prediction": "v"}), "epsilon"),
    (dict(tensors={EMBEDDING_KEY: torch.zeros(1, 77, 768)}), "shape [1, 77, 768]"),
    (dict(drop=[EMBEDDING_KEY]), "is missing"),
    (dict(tensors={EMBEDDING_KEY: torch.full((1, 77, 1024), float("nan"))}), "NaN or Inf"),
    (dict(tensors={"something.else": torch.zeros(3)}), "unexpected tensor 'something.else'"),
    (dict(drop=["diffusion_model.input_blocks.0.0.alpha"]), "lacks .alpha"),
    (dict(tensors={"diffusion_model.input_blocks.0.0.lora_A.weight": torch.zeros(8, 4, 3, 3)}),
     "inconsistent LoRA shapes"),
    # Alpha tensors are checked like the metadata alpha, and every tensor must be floating point.
    (dict(tensors={"diffusion_model.input_blocks.0.0.alpha": torch.tensor(-4.0)}),
     "layer 'diffusion_model.input_blocks.0.0' has alpha -4; it must be a positive number"),
    (dict(tensors={"diffusion_model.input_blocks.0.0.alpha": torch.tensor(0.0)}), "has alpha 0;"),
    (dict(tensors={"diffusion_model.input_blocks.0.0.alpha": torch.tensor(float("inf"))}), "NaN or Inf"),
    (dict(tensors={"diffusion_model.input_blocks.0.0.alpha": torch.tensor(4)}),
     "not floating point (first: diffusion_model.input_blocks.0.0.alpha, int64)"),
    (dict(tensors={"diffusion_model.input_blocks.0.0.lora_A.weight": torch.ones(4, 4, 3, 3, dtype=torch.int32)}),
     "not floating point (first: diffusion_model.input_blocks.0.0.lora_A.weight, int32)"),
    (dict(tensors={EMBEDDING_KEY: torch.zeros(1, 77, 1024, dtype=torch.bool)}), "not floating point"),
])
def test_bad_files_are_rejected_with_a_reason(good, change, expected):
    _rewrite(good, **change)
    with pytest.raises(WeightFileError) as e:
        read_weights(good)
    assert expected in str(e.value)
    assert "good.safetensors" in str(e.value)


def test_truncated_file(good):
    data = open(good, "rb").read()
    with open(good, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="truncated, corrupt"):
        read_weights(good)


def test_not_safetensors_at_all(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(WeightFileError, match="truncated, corrupt"):
        read_weights(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match="not found"):
        read_weights(str(tmp_path / "nope.safetensors"))
