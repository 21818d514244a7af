"""The generator's perceptual loss as the config asks for it (EA-DISTS, DISTS or none)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from .config import Config
from .dists import DISTS, EADISTS, STAGE_CHANNELS, VGG16_BLOCKS

log = logging.getLogger("d3sr.train")


def random_vgg16_features(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random VGG16 `features.N` tensors (He init): for tests with loss.pretrained_vgg false."""
    widths = (64, 128, 256, 512, 512)
    gen = torch.Generator().manual_seed(seed)
    out, in_ch = {}, 3
    for block, width in zip(VGG16_BLOCKS, widths):
        for index in block:
            std = math.sqrt(2 / (9 * in_ch))
            out[f"features.{index}.weight"] = torch.randn(width, in_ch, 3, 3, generator=gen) * std
            out[f"features.{index}.bias"] = torch.zeros(width)
            in_ch = width
    return out


def build_perceptual(cfg: Config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """EA-DISTS (or DISTS) from training.dists, (B,3,H,W) x 2 -> (B,); None when disabled."""
    lc = cfg.loss
    if lc.perceptual == "none" or lc.lambda_perceptual == 0:
        return None
    if lc.pretrained_vgg:
        dists = DISTS(vgg_path=lc.vgg_path)
    else:
        log.warning("loss.pretrained_vgg is false: EA-DISTS uses RANDOM VGG weights (tests only)")
        n = sum(STAGE_CHANNELS)
        dists = DISTS(random_vgg16_features(cfg.seed), {"alpha": torch.ones(n), "beta": torch.ones(n)})
    return (EADISTS(dists) if lc.perceptual == "ea_dists" else dists).eval()
