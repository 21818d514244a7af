"""DISTS (Ding et al. 2020) and the edge-aware EA-DISTS loss of D3SR.

DISTS: VGG16 (ImageNet weights) with every max-pool replaced by an L2 pool over a 3x3
Hanning window (stride 2). Six stages are compared: the image itself, relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3 (3 + 64 + 128 + 256 + 512 + 512 = 1475 channels). Per channel,
from global spatial statistics of x's and y's feature maps:

    texture   l = (2 mx my + c1) / (mx^2 + my^2 + c1)
    structure s = (2 cov_xy + c2) / (var_x + var_y + c2),   c1 = c2 = 1e-6
    DISTS = 1 - sum_c (alpha_c l_c + beta_c s_c),  alpha, beta >= 0, sum(alpha + beta) = 1

EA-DISTS(x, y) = DISTS(x, y) + DISTS(S(x), S(y)), S the Sobel gradient magnitude of the
grey image (see :func:`sobel_magnitude`). The one-channel S image is repeated to three
channels and fed to DISTS unscaled (range [0, 4 sqrt 2]); D3SR's paper does not say how,
this is our choice (``edge_scale`` makes it configurable).

Images are (B, 3, H, W) RGB in [0, 1]. Scores are (B,) tensors; the VGG weights are frozen,
gradients flow to the inputs. Under autocast the convolutions run in reduced precision;
the L2 pooling and all statistics always run in fp32 (squares of VGG activations overflow
fp16).
"""

from __future__ import annotations

from pathlib import Path

import kornia
import torch
from torch import nn
from torch.nn import functional as F

from . import pretrained
from .precision import at_least_fp32

__all__ = ["DISTS", "EADISTS", "L2Pool", "VGG16Trunk", "sobel_magnitude"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_CHANNELS = (3, 64, 128, 256, 512, 512)
# Convolutions per VGG16 block, with their torchvision `features.N` indices.
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
STABILITY = 1e-6  # c1 = c2 of DISTS


class L2Pool(nn.Module):
    """sqrt(hanning3x3 * x^2), stride 2, padding 1, per channel. (B, C, H, W) -> (B, C, ~H/2, ~W/2)."""

    def __init__(self) -> None:
        super().__init__()
        window = torch.hann_window(5, periodic=False, dtype=torch.float64)[1:-1]  # 0.5, 1, 0.5
        kernel = torch.outer(window, window)
        self.register_buffer("kernel", (kernel / kernel.sum()).float()[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = at_least_fp32(x)
            channels = x.shape[1]
            weight = self.kernel.expand(channels, 1, 3, 3)
            pooled = F.conv2d(x * x, weight, stride=2, padding=1, groups=channels)
            return torch.sqrt(pooled + 1e-12)


def _given(value: torch.Tensor, shape: torch.Size, name: str) -> nn.Parameter:
    """A copy of `value` as a parameter in the default float dtype; ValueError unless of `shape`."""
    if value.shape != shape:
        raise ValueError(f"VGG16 {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return nn.Parameter(value.detach().to(torch.get_default_dtype(), copy=True))


class VGG16Trunk(nn.Module):
    """VGG16 convolutions with L2 pooling; returns the six DISTS stages as a list."""

    def __init__(self, features: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        in_ch = 3
        for block in VGG16_BLOCKS:
            layers: list[nn.Module] = [L2Pool()] if self.blocks else []
            for index in block:
                weight = features[f"features.{index}.weight"]
                # Made on the meta device, then given the weights: no random initialisation to
                # overwrite (0.07 s a trunk on one core).
                conv = nn.Conv2d(in_ch, weight.shape[0], 3, padding=1, device="meta")
                conv.weight = _given(weight, conv.weight.shape, f"features.{index}.weight")
                conv.bias = _given(features[f"features.{index}.bias"], conv.bias.shape, f"features.{index}.bias")
                layers += [conv, nn.ReLU()]
                in_ch = weight.shape[0]
            self.blocks.append(nn.Sequential(*layers))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = [x]
        h = (x - self.mean) / self.std
        for block in self.blocks:
            h = block(h)
            stages.append(h)
        return stages


def _stage_similarities(fx: torch.Tensor, fy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Texture and structure terms, each (B, C), from two (B, C, H, W) feature maps (in fp32, or
    fp64 for fp64 maps)."""
    fx, fy = at_least_fp32(fx), at_least_fp32(fy)
    mx, my = fx.mean(dim=(2, 3)), fy.mean(dim=(2, 3))
    var_x = (fx - mx[..., None, None]).square().mean(dim=(2, 3))
    var_y = (fy - my[..., None, None]).square().mean(dim=(2, 3))
    cov = (fx * fy).mean(dim=(2, 3)) - mx * my
    texture = (2 * mx * my + STABILITY) / (mx.square() + my.square() + STABILITY)
    structure = (2 * cov + STABILITY) / (var_x + var_y + STABILITY)
    return texture, structure


class DISTS(nn.Module):
    """DISTS distance with the published weights. forward(x, y) -> (B,), 0 for x == y.

    Args:
        vgg_features: torchvision-format VGG16 `features.N.*` tensors; default: fetched by
            :func:`training.pretrained.vgg16_features` (from ``vgg_path`` if given).
        alpha_beta: {'alpha', 'beta'} of shape (1, 1475, 1, 1); default: the DISTS release.
    """

    def __init__(
        self,
        vgg_features: dict[str, torch.Tensor] | None = None,
        alpha_beta: dict[str, torch.Tensor] | None = None,
        vgg_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.trunk = VGG16Trunk(vgg_features if vgg_features is not None else pretrained.vgg16_features(vgg_path))
        weights = alpha_beta if alpha_beta is not None else pretrained.dists_alpha_beta()
        alpha, beta = weights["alpha"].flatten().float(), weights["beta"].flatten().float()
        if alpha.numel() != sum(STAGE_CHANNELS) or beta.numel() != sum(STAGE_CHANNELS):
            raise ValueError(f"alpha/beta must have {sum(STAGE_CHANNELS)} entries")
        total = alpha.sum() + beta.sum()
        self.register_buffer("alpha", alpha / total)
        self.register_buffer("beta", beta / total)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) images, got {tuple(x.shape)} and {tuple(y.shape)}")
        batch = x.shape[0]
        # One trunk pass over both images keeps batch statistics-free layers efficient.
        stages = self.trunk(torch.cat([x, y], dim=0))
        similarity = x.new_zeros(batch, dtype=self.alpha.dtype)
        start = 0
        for feats, channels in zip(stages, STAGE_CHANNELS):
            texture, structure = _stage_similarities(feats[:batch], feats[batch:])
            alpha = self.alpha[start : start + channels]
            beta = self.beta[start : start + channels]
            similarity = similarity + (texture * alpha).sum(1) + (structure * beta).sum(1)
            start += channels
        return 1.0 - similarity


def sobel_magnitude(image: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image: (B, 3, H, W) in [0, 1] -> (B, 1, H, W).

    grey = mean of R, G, B; Gx = [[-1,0,1],[-2,0,2],[-1,0,1]] (unnormalised), Gy = Gx^T;
    S = sqrt(Gx*grey^2 + Gy*grey^2 + eps), with replicate padding at the borders (kornia's).
    ``eps`` keeps the gradient finite where the image is flat (sqrt(eps) = 1e-6 offset).
    Always computed in fp32 (fp64 for an fp64 image), also under autocast.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        grey = at_least_fp32(image).mean(dim=1, keepdim=True)
        return kornia.filters.sobel(grey, normalized=False, eps=eps)


class EADISTS(nn.Module):
    """EA-DISTS(x, y) = DISTS(x, y) + DISTS(S(x), S(y)); (B, 3, H, W) in [0, 1] -> (B,).

    ``edge_scale`` multiplies S before it enters DISTS (1.0: unscaled, our default).
    """

    def __init__(self, dists: DISTS | None = None, edge_scale: float = 1.0) -> None:
        super().__init__()
        self.dists = dists if dists is not None else DISTS()
        self.edge_scale = edge_scale

    def edge_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the Sobel magnitude repeated to (B, 3, H, W)."""
        return (self.edge_scale * sobel_magnitude(image)).expand(-1, 3, -1, -1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dists(x, y) + self.dists(self.edge_image(x), self.edge_image(y))
