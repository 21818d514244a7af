"""PSNR and SSIM on the Y channel, with pyiqa's conventions (the field's numbers).

Y is ITU-R BT.601 luma of RGB in [0, 1]: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255.
- PSNR: on Y in [0, 1] (data range 1, not rounded), 10 log10(1 / (MSE + 1e-8)).
- SSIM: Y scaled to [0, 255] and rounded to integers (as MATLAB sees uint8 images), fp64,
  11x11 Gaussian window with sigma 1.5 (normalised), 'valid' filtering (no padding),
  C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, the contrast-structure map clipped at 0,
  mean over the map; no downsampling.
Inputs (B, 3, H, W) in [0, 1]; outputs (B,) fp64.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["SSIM_WINDOW", "crop_border", "psnr_y", "rgb_to_y", "ssim_y"]

BT601_Y = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11   # 'valid' filtering: images need at least this many pixels on each side


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) BT.601 luma in [16/255, 235/255]."""
    weights = torch.tensor(BT601_Y, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return ((image * weights).sum(dim=1, keepdim=True) + 16.0) / 255.0


def crop_border(image: torch.Tensor, border: int) -> torch.Tensor:
    """Drop `border` pixels on every side of (..., H, W); ValueError if nothing would be left."""
    if border > 0 and 2 * border >= min(image.shape[-2:]):
        raise ValueError(f"a crop border of {border} leaves nothing of a {image.shape[-1]}x{image.shape[-2]} image")
    return image[..., border:-border, border:-border] if border > 0 else image


def psnr_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB on the Y channel of two (B, 3, H, W) images in [0, 1] -> (B,)."""
    yx, yy = rgb_to_y(x.double()), rgb_to_y(y.double())
    mse = (yx - yy).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / (mse + 1e-8))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    window = torch.outer(g, g)
    return (window / window.sum())[None, None]


def ssim_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM on the rounded [0, 255] Y channel of two (B, 3, H, W) images in [0, 1] -> (B,).
    H and W must be at least SSIM_WINDOW (ValueError otherwise)."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {x.shape[-1]}x{x.shape[-2]}")
    yx = torch.round(rgb_to_y(x.double()) * 255.0)
    yy = torch.round(rgb_to_y(y.double()) * 255.0)
    window = _gaussian_window().to(yx.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mu_x, mu_y = blur(yx), blur(yy)
    var_x = blur(yx * yx) - mu_x.square()
    var_y = blur(yy * yy) - mu_y.square()
    cov = blur(yx * yy) - mu_x * mu_y
    contrast_structure = torch.relu((2 * cov + c2) / (var_x + var_y + c2))
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))
