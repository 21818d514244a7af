"""Colour fixes against their definitions."""

from __future__ import annotations

import torch

from d3sr_core.colour_fix import adain, apply_colour_fix, low_frequency, wavelet


def test_adain_matches_reference_statistics():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 40, 30, generator=gen) * 0.5
    ref = torch.rand(2, 3, 40, 30, generator=gen) * 0.2 + 0.6
    out = adain(img, ref)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(out.std((2, 3)), ref.std((2, 3)), atol=1e-4)
    # Per-channel affine map: correlation with the input is preserved exactly.
    a = (img - img.mean((2, 3), keepdim=True)).flatten(2)
    b = (out - out.mean((2, 3), keepdim=True)).flatten(2)
    corr = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert torch.allclose(corr, torch.ones_like(corr), atol=1e-5)


def test_wavelet_takes_low_frequencies_from_the_reference():
    img = torch.full((1, 3, 32, 32), 0.2)
    ref = torch.full((1, 3, 32, 32), 0.7)
    assert torch.allclose(wavelet(img, ref), ref, atol=1e-6)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(wavelet(x, x), x, atol=1e-6)


def test_low_frequency_is_a_normalised_blur():
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    lf = low_frequency(x)
    assert abs(lf.mean().item() - x.mean().item()) < 0.02
    assert lf.std() < 0.2 * x.std()


def test_none_is_identity():
    x = torch.rand(1, 3, 8, 8)
    assert apply_colour_fix(x, torch.zeros_like(x), "none") is x
