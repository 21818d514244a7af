"""Hostile and careless input to the pipeline and the OSEDiff reader: NaN pixels, strengths and
outputs are refused with a clear error (plain and tiled path, which the nodes call as is), and
no malformed OSEDiff pickle gets past the reader as anything but its own error."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from d3sr_core import osediff, pipeline, tiling, weight_format
from d3sr_core.model import load_d3sr
from d3sr_core.upscale import upscale
from d3sr_core.weight_format import read_weights, write_weights
from devtools import synthetic


@pytest.fixture(scope="module")
def d3sr(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    return load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))


@pytest.fixture(scope="module")
def huge_alpha_file(models_dir, tmp_path_factory):
    """The tiny-t399 weights with every LoRA alpha huge but finite (1e30)."""
    weights = read_weights(str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    lora = {name: (a, b, 1e30) for name, (a, b, _alpha) in weights.lora.items()}
    path = tmp_path_factory.mktemp("huge") / "huge-alpha.safetensors"
    write_weights(str(path), dataclasses.replace(weights, lora=lora))
    return path


def _upscalers():
    return {"plain": lambda d, img, **kw: upscale(d, img, 2.0, **kw),
            "tiled": lambda d, img, **kw: tiling.upscale_tiled(d, img, 2.0, tile=64, overlap=0, **kw)}


@pytest.mark.parametrize("path", ["plain", "tiled"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_pixels_are_refused(d3sr, path, bad):
    image = torch.rand(2, 12, 10, 3, generator=torch.Generator().manual_seed(0))
    image[1, 3, 4, 2] = bad
    with pytest.raises(ValueError, match=r"1 NaN or infinite pixel value\(s\) in image\(s\) 2 of 2"):
        _upscalers()[path](d3sr, image)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_strength_is_refused(tiny_sd2, models_dir, strength):
    model, vae = tiny_sd2
    with pytest.raises(ValueError, match="LoRA strength .* is not a finite number"):
        load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"), strength)
    assert len(model.patches) == 0


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), 0.5, 9.0])
def test_bad_factor_is_refused(d3sr, factor):
    image = torch.rand(1, 8, 8, 3)
    for run in (upscale, tiling.upscale_tiled):
        with pytest.raises(ValueError, match="outside 1..8"):
            run(d3sr, image, factor)


@pytest.mark.parametrize("path", ["plain", "tiled"])
@pytest.mark.parametrize("colour_fix", ["adain", "none"])
def test_non_finite_output_is_an_error_naming_the_causes(tiny_sd2, huge_alpha_file, path, colour_fix):
    model, vae = tiny_sd2
    huge = load_d3sr(model, vae, str(huge_alpha_file))
    image = torch.rand(1, 12, 10, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(pipeline.NonFiniteOutputError) as err:
        _upscalers()[path](huge, image, colour_fix=colour_fix)
    message = str(err.value)
    assert "NaN or infinite" in message and "huge-alpha.safetensors" in message
    assert "LoRA alphas" in message and "--fp32-unet" in message and "\n" not in message


def test_finite_output_still_passes(d3sr):
    image = torch.rand(1, 12, 10, 3, generator=torch.Generator().manual_seed(2))
    for run in (upscale, tiling.upscale_tiled):
        out = run(d3sr, image, 2.0)
        assert out.shape == (1, 24, 20, 3) and torch.isfinite(out).all()


# ---- OSEDiff pickles: malformed and malicious -------------------------------------------------

@pytest.fixture(scope="module")
def small_osediff_pkl(models_dir, tmp_path_factory) -> Path:
    """The generated OSEDiff file (conftest: make_osediff_dict on the tiny SD2 checkpoint) cut to
    three UNet LoRA layers, conv_in and two VAE LoRA layers, so each load takes milliseconds and
    most mutated bytes land in the pickle's structure rather than in tensor data."""
    raw = torch.load(models_dir / "d3sr" / "osediff-tiny.pkl", map_location="cpu", weights_only=True)
    small = {k: v for k, v in raw.items() if not isinstance(v, (dict, list))}
    for sd_key, list_keys, count in (("state_dict_unet", [k for k in raw if k.startswith("unet_lora_")], 3),
                                     ("state_dict_vae", ["vae_lora_encoder_modules"], 2)):
        modules = [m for k in list_keys for m in raw[k]][:count]
        for k in list_keys:
            small[k] = [m for m in raw[k] if m in modules]
        small[sd_key] = {n: t for n, t in raw[sd_key].items()
                         if n.split(".lora_")[0] in modules or n.startswith("conv_in.base_layer")}
    path = tmp_path_factory.mktemp("fuzz") / "osediff-small.pkl"
    torch.save(small, path)
    weights, report = osediff.convert_osediff(osediff.read_osediff_pickle(str(path)),
                                              synthetic.TINY_SD2_UNET_CONFIG)
    assert report.ok and len(weights.lora) == 3 and len(weights.vae_lora) == 2 and len(weights.full_weights) == 2
    return path


def _structural_positions(path: Path) -> tuple[list[int], list[int]]:
    """Byte offsets of the pickle program (data.pkl) and of the zip headers and directory."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        directory = z.start_dir
    pickle_info = next(i for i in infos if i.filename.endswith("data.pkl"))
    start = pickle_info.header_offset + 30 + len(pickle_info.filename.encode()) + len(pickle_info.extra)
    program = list(range(start, start + pickle_info.file_size))
    headers = [o for i in infos for o in range(i.header_offset, i.header_offset + 30 + len(i.filename.encode()))]
    headers += list(range(directory, path.stat().st_size))
    return program, headers


def _outcome(path: Path) -> str:
    """'clean' (loads and converts), or 'refused' (the reader's or converter's own error);
    anything else raises and fails the test."""
    try:
        raw = osediff.read_osediff_pickle(str(path))
        osediff.convert_osediff(raw, synthetic.TINY_SD2_UNET_CONFIG)
    except osediff.OSEDiffFormatError as e:
        message = str(e)
        assert "\n" not in message and "weights_only" not in message and "\x1b" not in message, message
        return "refused"
    return "clean"


def test_mutated_osediff_pickles_load_cleanly_or_give_the_readers_error(small_osediff_pkl, tmp_path, monkeypatch):
    """Seeded fuzz: 360 single-byte mutations (half in the pickle program, a quarter in the zip
    headers and directory, a quarter anywhere) and 12 truncations."""
    # The converter's layout tables depend only on the (fixed) UNet config: computed once.
    shapes = osediff.expected_shapes(synthetic.TINY_SD2_UNET_CONFIG)
    unet_map = osediff.unet_name_map(synthetic.TINY_SD2_UNET_CONFIG)
    monkeypatch.setattr(osediff, "expected_shapes", lambda config: shapes)
    monkeypatch.setattr(osediff, "unet_name_map", lambda config: unet_map)
    original = small_osediff_pkl.read_bytes()
    program, headers = _structural_positions(small_osediff_pkl)
    rng = random.Random(20240611)
    mutated = tmp_path / "osediff.pkl"
    outcomes: dict[str, int] = {"clean": 0, "refused": 0}
    for i in range(360):
        pool = program if i % 4 < 2 else headers if i % 4 == 2 else range(len(original))
        data = bytearray(original)
        position = rng.choice(pool)
        data[position] = (data[position] + rng.randrange(1, 256)) % 256   # always a different byte
        mutated.write_bytes(bytes(data))
        outcomes[_outcome(mutated)] += 1
    for length in sorted(rng.sample(range(len(original)), 12)):
        mutated.write_bytes(original[:length])
        assert _outcome(mutated) == "refused"
    # Both outcomes occur often: the sample reaches the reader's checks, not only the zip layer.
    assert outcomes["clean"] >= 30 and outcomes["refused"] >= 100, outcomes


class _Call:
    """Pickles as a call of `func(*args)`; torch.save writes it, the safe loader must refuse it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, args, asked", [
    (os.system, ("touch {marker}",), r"'os\.system' \(pickled as 'posix\.system'\)"),
    (eval, ("open({marker!r}, 'w')",), r"'eval'"),
    (subprocess.Popen, (["touch", "{marker}"],), r"'\w+\.Popen'"),   # pickle's Python 2 name: commands
    (open, ("{marker}", "w"), r"'io\.open'"),
])
def test_code_in_a_pickle_is_refused_naming_what_it_asked_for(tmp_path, func, args, asked):
    if func is os.system and os.name != "posix":
        pytest.skip("os.system pickles as nt.system on Windows")
    marker = tmp_path / "code-ran"
    payload = _Call(func, *(a.format(marker=str(marker)) if isinstance(a, str) else
                            [x.format(marker=str(marker)) for x in a] for a in args))
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {}, "x": payload}, path)
    with pytest.raises(osediff.OSEDiffFormatError) as err:
        osediff.read_osediff_pickle(str(path))
    message = str(err.value)
    assert re.search(f"refused: it asks to import {asked}, which a weight file never needs", message), message
    assert "nothing in it was run" in message and "weights_only" not in message.lower()
    assert "\n" not in message and "\x1b" not in message
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    {"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {"x\x1b[2Jy.lora_A.a.weight": torch.zeros(4, 4)},
     "state_dict_vae": {}},
    {"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {},
     "unet_lora_encoder_modules": ["down\nblocks"]},
    {"rank_unet": 4, "state_dict_unet": {}, "\x1b]0;title\x07": 1},
])
def test_names_from_the_file_cannot_inject_lines_or_terminal_codes(tmp_path, content):
    path = tmp_path / "osediff.pkl"
    torch.save(content, path)
    with pytest.raises(osediff.OSEDiffFormatError) as err:
        osediff.read_osediff_pickle(str(path))
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message and "\x07" not in message
    assert "control characters" in message or "lacks rank_vae" in message


def test_refusal_reasons_are_whole_words():
    long_reason = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will "
                   "likely succeed, but it can result in arbitrary code execution.\n\nUnsupported operand 149 "
                   + "in a very long explanation " * 10)
    text = osediff._refusal(long_reason)
    assert "weights_only" not in text and "False" not in text
    detail = text[text.index("(") + 1: text.index("):")]
    assert detail.startswith("Unsupported operand 149") and detail.endswith(" ...")
    assert detail[: -len(" ...")].split()[-1] in "in a very long explanation".split()


# ---- the converter's output path -----------------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("folder", "is a folder"),
    ("full_disk", "the disk is full"),
    ("read_only", "the file system is read-only"),
])
def test_converter_output_problems_are_one_line_errors(small_osediff_pkl, tmp_path, monkeypatch, capsys,
                                                       case, expected):
    dst = tmp_path / "out" / "osediff.safetensors"
    dst.parent.mkdir()
    if case == "folder":
        dst.mkdir()
    else:   # what the atomic writer raises when the disk is full / the file system is read-only
        code = errno.ENOSPC if case == "full_disk" else errno.EROFS

        def failing_save(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(weight_format, "save_file", failing_save)
    args = ["convert", str(small_osediff_pkl), str(dst)] + (["--force"] if case == "folder" else [])
    assert osediff.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {dst}") and expected in err[0], err
    assert sorted(p.name for p in dst.parent.iterdir()) == (["osediff.safetensors"] if case == "folder" else [])
