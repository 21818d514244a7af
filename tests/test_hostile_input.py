"""Hostile and careless input to the pipeline and the OSEDiff reader: NaN pixels, strengths and
outputs are refused with a clear error (plain and tiled path, which the nodes call as is), and
no malformed OSEDiff pickle gets past the reader as anything but its own error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from d3sr_core import pipeline, tiling
from d3sr_core.model import load_d3sr
from d3sr_core.weight_format import read_weights, write_weights


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
    return {"plain": lambda d, img, **kw: pipeline.upscale(d, img, 2.0, **kw),
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
    for upscale in (pipeline.upscale, tiling.upscale_tiled):
        with pytest.raises(ValueError, match="outside 1..8"):
            upscale(d3sr, image, factor)


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
    for upscale in (pipeline.upscale, tiling.upscale_tiled):
        out = upscale(d3sr, image, 2.0)
        assert out.shape == (1, 24, 20, 3) and torch.isfinite(out).all()
