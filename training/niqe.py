"""NIQE (Mittal et al. 2013), no-reference, with pyiqa's / MATLAB's conventions.

Input (B, 3, H, W) RGB in [0, 1]; output (B,) fp64, lower is better. Steps:
- grey = 255 * (0.299 R + 0.587 G + 0.114 B), rounded to integers (pyiqa's default
  'yiq' Y), fp64; cropped to whole 96x96 blocks;
- at two scales (full, then MATLAB-bicubic half size with antialiasing):
  MSCN = (I - mu) / (sigma + 1), mu / sigma from a 7x7 Gaussian (sigma 7/6, replicate
  borders); per block (96, then 48 pixels) 18 features: the generalised-Gaussian fit of
  MSCN (shape, scale) and asymmetric-GGD fits (shape, mean, left and right scale) of the
  products with the neighbour at 4 orientations;
- a Gaussian fit of the 36-d block features (NaN-aware mean, covariance of the complete
  blocks) is compared with the pristine model (``niqe_pris_params.npz``):
  sqrt(d^T pinv((C_pristine + C_image) / 2) d), d the difference of means.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from . import pretrained

__all__ = ["NIQE", "matlab_imresize_half"]

BLOCK = 96
GREY = (0.299, 0.587, 0.114)
_GAMMA_GRID = torch.arange(0.2, 10.0005, 0.001, dtype=torch.float64)


def _gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    window = torch.outer(g, g)
    return (window / window.sum())[None, None]


def _mscn(image: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted contrast-normalised coefficients of (B, 1, H, W)."""
    window = _gaussian_window().to(image)
    padded = F.pad(image, (3, 3, 3, 3), mode="replicate")
    mu = F.conv2d(padded, window)
    second = F.conv2d(padded * padded, window)
    sigma = torch.sqrt((second - mu * mu).abs() + torch.finfo(image.dtype).eps)
    return (image - mu) / (sigma + 1.0)


def _aggd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric generalised Gaussian fit of (N, h, w) samples: shape, left, right scale."""
    grid = _GAMMA_GRID.to(x)
    r_grid = torch.exp(2 * torch.lgamma(2 / grid) - torch.lgamma(1 / grid) - torch.lgamma(3 / grid))
    flat = x.flatten(1)
    neg, pos = flat < 0, flat > 0
    left = torch.sqrt((flat.square() * neg).sum(1) / neg.sum(1))
    right = torch.sqrt((flat.square() * pos).sum(1) / pos.sum(1))
    gamma_hat = left / right
    r_hat = flat.abs().mean(1).square() / flat.square().mean(1)
    r_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = grid[(r_grid[None] - r_norm[:, None]).abs().argmin(1)]
    factor = torch.exp(torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).sqrt()
    return alpha, left * factor, right * factor


def _block_features(mscn: torch.Tensor, block: int) -> torch.Tensor:
    """(H, W) MSCN map -> (num_blocks, 18) features, blocks in row-major order."""
    h, w = mscn.shape
    blocks = mscn.reshape(h // block, block, w // block, block).permute(0, 2, 1, 3).reshape(-1, block, block)
    alpha, left, right = _aggd(blocks)
    feats = [alpha, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        product = blocks * torch.roll(blocks, shifts=shift, dims=(1, 2))
        alpha, left, right = _aggd(product)
        mean = (right - left) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
        feats += [alpha, mean, left, right]
    return torch.stack(feats, dim=1)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    inner = 1.5 * a**3 - 2.5 * a**2 + 1
    outer = -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
    return torch.where(a <= 1, inner, torch.where(a <= 2, outer, torch.zeros_like(a)))


def _half_matrix(length: int) -> torch.Tensor:
    """(length // 2, length) MATLAB imresize(..., 0.5, 'bicubic') weights, antialiased,
    symmetric borders."""
    scale, width = 0.5, 4.0 / 0.5
    out = torch.arange(1, math.ceil(length * scale) + 1, dtype=torch.float64)
    centre = out / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(centre - width / 2)
    taps = left[:, None] + torch.arange(math.ceil(width) + 2, dtype=torch.float64)[None]
    weights = scale * _cubic(scale * (centre[:, None] - taps))
    weights = weights / weights.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(length), torch.arange(length - 1, -1, -1)])
    index = mirror[((taps.long() - 1) % (2 * length))]
    matrix = torch.zeros(len(out), length, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights)
    return matrix


def matlab_imresize_half(image: torch.Tensor) -> torch.Tensor:
    """MATLAB's imresize(I, 0.5) (bicubic, antialiased) of (H, W) fp64, H and W even."""
    rows, cols = _half_matrix(image.shape[0]).to(image), _half_matrix(image.shape[1]).to(image)
    return rows @ image @ cols.T


class NIQE:
    """Callable: NIQE of (B, 3, H, W) RGB in [0, 1] -> (B,) fp64 (H, W >= 96)."""

    def __init__(self, params: dict[str, torch.Tensor] | None = None) -> None:
        params = params if params is not None else pretrained.niqe_params()
        self.mu = params["mu_pris_param"].reshape(-1).double()
        self.cov = params["cov_pris_param"].double()

    def score_grey(self, grey: torch.Tensor) -> torch.Tensor:
        """NIQE of one (H, W) grey image on the integer 0..255 scale, fp64 scalar."""
        h, w = (grey.shape[0] // BLOCK) * BLOCK, (grey.shape[1] // BLOCK) * BLOCK
        if h == 0 or w == 0:
            raise ValueError(f"NIQE needs at least {BLOCK}x{BLOCK} pixels, got {tuple(grey.shape)}")
        image = grey[:h, :w]
        feats = []
        for block in (BLOCK, BLOCK // 2):
            feats.append(_block_features(_mscn(image[None, None])[0, 0], block))
            if block == BLOCK:
                image = matlab_imresize_half(image / 255.0) * 255.0
        feats = torch.cat(feats, dim=1)
        mean = torch.nanmean(feats, dim=0)
        complete = feats[~torch.isnan(feats).any(dim=1)]
        cov = torch.cov(complete.T)
        diff = (self.mu.to(feats) - mean)[None]
        inverse = torch.linalg.pinv((self.cov.to(feats) + cov) / 2)
        return torch.sqrt((diff @ inverse @ diff.T)[0, 0])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor(GREY, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        grey = torch.round((images.double() * weights).sum(1) * 255.0)
        return torch.stack([self.score_grey(g) for g in grey])
