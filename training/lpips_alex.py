"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), the field's default LPIPS.

AlexNet (ImageNet weights) features after relu1..relu5 (64, 192, 384, 256, 256 channels)
of both images are unit-normalised along channels, their squared difference is weighted
per channel by the v0.1 linear heads, averaged over space and summed over the five
layers. Inputs (B, 3, H, W) RGB in [0, 1] (mapped to [-1, 1], then LPIPS's shift and
scale); output (B,), 0 for identical images. Frozen weights, differentiable in the inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import pretrained

__all__ = ["LPIPSAlex"]

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# (torchvision features index, stride, padding) of AlexNet's five convolutions.
ALEXNET_CONVS = ((0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1))
FEATURE_EPS = 1e-10


class LPIPSAlex(nn.Module):
    """LPIPS-Alex v0.1 distance: forward(x, y) -> (B,)."""

    def __init__(
        self,
        alexnet_features: dict[str, torch.Tensor] | None = None,
        heads: dict[str, torch.Tensor] | None = None,
        alexnet_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        feats = alexnet_features if alexnet_features is not None else pretrained.alexnet_features(alexnet_path)
        heads = heads if heads is not None else pretrained.lpips_alex_heads()
        self.convs = nn.ModuleList()
        for index, stride, padding in ALEXNET_CONVS:
            weight = feats[f"features.{index}.weight"]
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride=stride, padding=padding)
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(feats[f"features.{index}.bias"])
            self.convs.append(conv)
        for i in range(5):
            self.register_buffer(f"head{i}", heads[f"lin{i}"].reshape(1, -1, 1, 1).float())
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """relu1..relu5 of AlexNet for (B, 3, H, W) images in [0, 1]."""
        h = ((2 * image - 1) - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pools sit before conv2 and conv3
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            h = F.relu(conv(h))
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) images, got {tuple(x.shape)} and {tuple(y.shape)}")
        batch = x.shape[0]
        total = x.new_zeros(batch, dtype=torch.float32)
        for i, feats in enumerate(self.features(torch.cat([x, y], dim=0))):
            feats = feats.float()
            unit = feats / (feats.square().sum(dim=1, keepdim=True).sqrt() + FEATURE_EPS)
            diff = (unit[:batch] - unit[batch:]).square()
            total = total + (diff * getattr(self, f"head{i}")).sum(dim=1).mean(dim=(1, 2))
        return total
