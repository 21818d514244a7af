"""OSEDiff's weight file through the D3SR nodes, against an independent plain computation.

The OSEDiff-format file is generated from the tiny SD2 checkpoint (tests/reference_osediff.py).
The reference merges every LoRA into the raw ldm weights by hand, replaces conv_in, and runs
OSEDiff's one step at t = 999 with tests/reference_d3sr.py. The prompt embedding comes from a
real ComfyUI CLIP (the SD2 text encoder with seeded weights, loaded from tiny-sd2-clip).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_d3sr import d3sr_reference
from reference_osediff import ALPHA, RANK, make_osediff_dict, reference_modules

from d3sr_core import osediff, pipeline
from d3sr_core.model import load_d3sr
from d3sr_core.weight_format import WeightFileError, read_weights
from devtools import synthetic

TOL = 1e-4
PROMPT = "building, sky"

@pytest.fixture(scope="module")
def osediff_file(models_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    raw, truth = make_osediff_dict(str(models_dir / "checkpoints" / "tiny-sd2.safetensors"))
    path = tmp_path_factory.mktemp("osediff") / "osediff.pkl"
    torch.save(raw, path)
    return path, raw, truth


@pytest.fixture(scope="module")
def lr() -> torch.Tensor:
    return torch.rand(2, 12, 16, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pkl_output(tiny_sd2, sd2_clip, osediff_file, lr):
    model, vae = tiny_sd2
    d3sr = osediff.load_osediff(model, vae, str(osediff_file[0]), clip=sd2_clip, prompt=PROMPT)
    return d3sr, pipeline.upscale(d3sr, lr, 4.0, "none")


def test_pkl_matches_plain_osediff_forward(models_dir, sd2_clip, osediff_file, lr, pkl_output):
    path, raw, truth = osediff_file
    d3sr, out = pkl_output
    assert d3sr.timestep == 999 and out.shape == (2, 48, 64, 3)
    emb = sd2_clip.encode_from_tokens(sd2_clip.tokenize(PROMPT)).float()
    assert emb.shape == (1, 77, 1024) and torch.equal(d3sr.text_embedding, emb)
    ckpt = str(models_dir / "checkpoints" / "tiny-sd2.safetensors")
    unet, vae, plain_vae = reference_modules(ckpt, truth)
    ref = d3sr_reference(unet, vae, lr.movedim(-1, 1), 4.0, 999, emb, multiple=16)
    err = (out.movedim(-1, 1) - ref).abs().max().item()
    assert err < TOL, f"max abs difference {err}"
    # The VAE-encoder LoRA must matter (it is the part most easily dropped silently).
    no_vae_lora = d3sr_reference(unet, plain_vae, lr.movedim(-1, 1), 4.0, 999, emb, multiple=16)
    assert (no_vae_lora - ref).abs().max().item() > 100 * TOL


def test_every_peft_key_is_applied(osediff_file):
    _path, raw, truth = osediff_file
    weights, report = osediff.convert_osediff(raw, synthetic.TINY_SD2_UNET_CONFIG)
    assert report.ok, report.summary()
    every = set(raw["state_dict_unet"]) | set(raw["state_dict_vae"])
    assert set(report.applied) == every and len(report.applied) == len(every)
    assert len(weights.lora) == len(truth["unet"]) and len(weights.vae_lora) == len(truth["vae"])
    assert set(weights.full_weights) == {"diffusion_model.input_blocks.0.0.weight",
                                         "diffusion_model.input_blocks.0.0.bias"}
    assert {a for _a, _b, a in weights.lora.values()} == {ALPHA}


def test_stray_keys_are_reported_not_dropped(osediff_file):
    _path, raw, _truth = osediff_file
    bad = dict(raw, state_dict_unet=dict(raw["state_dict_unet"]))
    sd = bad["state_dict_unet"]
    sd["mid_block.attentions.0.proj_in.lora_magnitude_vector.default_others.weight"] = torch.ones(320)
    sd["no_such_block.conv.lora_A.default_others.weight"] = torch.zeros(RANK, 320, 3, 3)
    sd["no_such_block.conv.lora_B.default_others.weight"] = torch.zeros(320, RANK, 1, 1)
    lone = "conv_out.lora_A.default_others.weight"
    sd[lone.replace("conv_out", "conv_extra")] = torch.zeros(RANK, 320, 3, 3)
    sd["extra_head.weight"] = torch.zeros(4, 4)                     # a parameter ComfyUI lacks
    sd["conv_out.base_layer.bias"] = torch.zeros(7)                  # wrong shape
    bad["unet_lora_others_modules"] = raw["unet_lora_others_modules"] + ["mid_block.listed_only"]
    _, report = osediff.convert_osediff(bad, synthetic.TINY_SD2_UNET_CONFIG, strict=False)
    stray = {k for k in sd if k not in raw["state_dict_unet"]}
    assert set(report.unused) == stray, report.summary()
    assert report.missing == ["mid_block.listed_only"]
    with pytest.raises(osediff.OSEDiffFormatError, match="lora_magnitude_vector"):
        osediff.convert_osediff(bad, synthetic.TINY_SD2_UNET_CONFIG)


def test_converted_safetensors_gives_identical_output(tiny_sd2, sd2_clip, models_dir, osediff_file, lr,
                                                      pkl_output, tmp_path, capsys):
    model, vae = tiny_sd2
    # --checkpoint gives the UNet layout (the tiny one here); it has no text encoder, so no
    # embedding is stored and CLIP is connected at load time.
    out_path = tmp_path / "osediff.safetensors"
    no_clip = str(models_dir / "checkpoints" / "tiny-sd2.safetensors")
    args = ["convert", str(osediff_file[0]), str(out_path), "--checkpoint", no_clip]
    assert osediff.main(args) == 0
    printed = capsys.readouterr().out
    assert "NOT applied" not in printed and "no prompt embedding stored" in printed
    w = read_weights(str(out_path))
    assert w.timestep == 999 and w.vae_lora and w.full_weights and w.text_embedding_kind == "none"
    d3sr = osediff.load_osediff(model, vae, str(out_path), clip=sd2_clip, prompt=PROMPT)
    assert torch.equal(pipeline.upscale(d3sr, lr, 4.0, "none"), pkl_output[1])
    # Without a stored embedding the plain D3SR loader refuses, naming the fix.
    with pytest.raises(WeightFileError, match="Load OSEDiff Model"):
        load_d3sr(model, vae, str(out_path))
    # An existing output is kept unless --force.
    stamp = out_path.stat().st_mtime_ns
    assert osediff.main(args) == 2 and "--force" in capsys.readouterr().err
    assert out_path.stat().st_mtime_ns == stamp

    # A checkpoint with its text encoder stores CLIP(prompt): the file then works in the plain
    # D3SR loader, no CLIP needed, with the identical result.
    ckpt = str(models_dir / "checkpoints" / "tiny-sd2-clip.safetensors")
    assert osediff.main(args[:3] + ["--force", "--checkpoint", ckpt, "--prompt", PROMPT]) == 0
    assert "no prompt embedding stored" not in capsys.readouterr().out
    w = read_weights(str(out_path))
    assert w.text_embedding_kind == "prompt" and w.prompt == PROMPT
    assert torch.equal(pipeline.upscale(load_d3sr(model, vae, str(out_path)), lr, 4.0, "none"), pkl_output[1])

    # A checkpoint without a text encoder cannot make the asked-for prompt embedding: an error, no file.
    other = tmp_path / "other.safetensors"
    assert osediff.main(["convert", str(osediff_file[0]), str(other), "--checkpoint", no_clip,
                         "--prompt", PROMPT]) == 2
    assert "has no text encoder" in capsys.readouterr().err and not other.exists()


def test_long_prompts_keep_the_first_77_tokens(tiny_sd2, sd2_clip, osediff_file):
    model, vae = tiny_sd2
    long = ", ".join(["a very detailed photograph of an old stone building"] * 12)
    full = sd2_clip.encode_from_tokens(sd2_clip.tokenize(long)).float()
    assert full.shape[1] > 77
    d3sr = osediff.load_osediff(model, vae, str(osediff_file[0]), clip=sd2_clip, prompt=long)
    assert torch.equal(d3sr.text_embedding, full[:, :77])


def test_users_model_and_vae_stay_untouched(tiny_sd2, osediff_file, pkl_output):
    model, vae = tiny_sd2
    d3sr, _ = pkl_output
    assert d3sr.vae is not vae and d3sr.vae.patcher is not vae.patcher
    assert len(d3sr.vae.patcher.patches) == len(osediff_file[2]["vae"])
    assert not vae.patcher.patches and not model.patches
    pixels = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    before = vae.encode(pixels)
    adapted = d3sr.vae.encode(pixels)              # patches the shared modules ...
    after = vae.encode(pixels)                     # ... and ComfyUI swaps them back out
    assert torch.equal(before, after)
    assert (adapted - before).abs().max().item() > 1e-3


def test_clip_is_needed_for_a_pickle(tiny_sd2, osediff_file):
    model, vae = tiny_sd2
    with pytest.raises(ValueError, match="connect the CLIP"):
        osediff.load_osediff(model, vae, str(osediff_file[0]))
    with pytest.raises(ValueError, match="no CLIP is connected"):
        osediff.load_osediff(model, vae, str(osediff_file[0]), prompt="a cat")


class _Payload:
    """Unpickling this would call open(marker, 'w'), creating the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_code(tiny_sd2, sd2_clip, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {},
                "payload": _Payload(str(marker))}, path)
    model, vae = tiny_sd2
    with pytest.raises(osediff.OSEDiffFormatError, match=r"refused: .*open.*nothing in it was run"):
        osediff.load_osediff(model, vae, str(path), clip=sd2_clip)
    assert not marker.exists()
    assert osediff.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_not_an_osediff_file(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(osediff.OSEDiffFormatError, match="not an OSEDiff weight file"):
        osediff.read_osediff_pickle(str(path))
    path.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(osediff.OSEDiffFormatError, match="truncated, corrupt"):
        osediff.read_osediff_pickle(str(path))
