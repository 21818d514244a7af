"""Colour correction of an SR output towards its (bicubic-upsampled) low-resolution input.

All functions take and return float tensors [B, C, H, W]; `reference` has the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOUR_FIXES = ("adain", "wavelet", "none")


def channel_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) standard deviation + eps of x [B, C, H, W], each
    [B, C, 1, 1]. A single pixel has deviation eps (the unbiased estimate would be NaN)."""
    n = x.shape[-2] * x.shape[-1]
    return x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, correction=min(1, n - 1)) + eps


def adain(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give each channel of `image` the mean and standard deviation of `reference`'s."""
    mu_i, sd_i = channel_stats(image, eps)
    mu_r, sd_r = channel_stats(reference, eps)
    return (image - mu_i) / sd_i * sd_r + mu_r


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur ([1,2,1]/4 outer product) with holes (a trous), replicate padding."""
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, dilation=dilation, groups=x.shape[1])


def low_frequency(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The residual low-pass after `levels` a-trous wavelet levels (dilations 1, 2, 4, ...)."""
    for i in range(levels):
        x = _blur(x, 2 ** i)
    return x


def wavelet(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of `image` plus low frequencies of `reference`."""
    return image - low_frequency(image, levels) + low_frequency(reference, levels)


def apply_colour_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch on `method` in COLOUR_FIXES; the result is clamped to [0, 1]."""
    if method == "none":
        return image
    if method == "adain":
        return adain(image, reference).clamp(0, 1)
    if method == "wavelet":
        return wavelet(image, reference).clamp(0, 1)
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOUR_FIXES)}")
