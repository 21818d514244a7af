"""Colour correction of an SR output towards its (bicubic-upsampled) low-resolution input.

All functions take and return float tensors [B, C, H, W]; `reference` has the same shape.

Two conventions:
  * D3SR's (default): in float, AdaIN divides by the standard deviation + eps.
  * OSEDiff's (`eight_bit=True`), as its test script does it on PIL images: the SR output is
    first truncated to 8 bits (torchvision's ToPILImage: floor(255 x)), AdaIN divides by
    sqrt(variance + eps), and the result is clamped and truncated to 8 bits again. The
    wavelet fix is the same formula in both; only the 8-bit steps differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOUR_FIXES = ("adain", "wavelet", "none")
WAVELET_LEVELS = 5    # a-trous levels of the wavelet fix: its blurs reach 2^levels - 1 pixels


def channel_stats(x: torch.Tensor, eps: float = 1e-5, eps_in_variance: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) standard deviation of x [B, C, H, W], each [B, C, 1, 1]:
    std + eps, or sqrt(var + eps) with `eps_in_variance` (OSEDiff's). A single pixel has
    variance 0 (the unbiased estimate would be NaN)."""
    n = x.shape[-2] * x.shape[-1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    if eps_in_variance:
        return mean, (x.var(dim=(2, 3), keepdim=True, correction=min(1, n - 1)) + eps).sqrt()
    return mean, x.std(dim=(2, 3), keepdim=True, correction=min(1, n - 1)) + eps


def adain(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5,
          eps_in_variance: bool = False) -> torch.Tensor:
    """Give each channel of `image` the mean and standard deviation of `reference`'s."""
    mu_i, sd_i = channel_stats(image, eps, eps_in_variance)
    mu_r, sd_r = channel_stats(reference, eps, eps_in_variance)
    return (image - mu_i) / sd_i * sd_r + mu_r


def truncate_8bit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the 8-bit level floor(255 x) / 255 that torchvision's ToPILImage stores
    (values outside [0, 1] are clamped first)."""
    return (x.clamp(0.0, 1.0) * 255.0).floor_() / 255.0


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur ([1,2,1]/4 outer product) with holes (a trous), replicate padding."""
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, dilation=dilation, groups=x.shape[1])


def low_frequency(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The residual low-pass after `levels` a-trous wavelet levels (dilations 1, 2, 4, ...)."""
    for i in range(levels):
        x = _blur(x, 2 ** i)
    return x


def wavelet(image: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """High frequencies of `image` plus low frequencies of `reference`."""
    return image - low_frequency(image, levels) + low_frequency(reference, levels)


def apply_colour_fix(image: torch.Tensor, reference: torch.Tensor, method: str,
                     eight_bit: bool = False) -> torch.Tensor:
    """Dispatch on `method` in COLOUR_FIXES; the result is clamped to [0, 1]. `eight_bit`:
    OSEDiff's convention (module docstring); the result then holds 8-bit levels k / 255."""
    if method not in COLOUR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOUR_FIXES)}")
    if eight_bit:
        image = truncate_8bit(image)
    if method == "none":
        return image
    if method == "adain":
        fixed = adain(image, reference, eps_in_variance=eight_bit).clamp(0, 1)
    else:
        fixed = wavelet(image, reference).clamp(0, 1)
    return truncate_8bit(fixed) if eight_bit else fixed
