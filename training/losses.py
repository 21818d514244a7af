"""The generator's pixel loss (MSE on a stated pixel range) and perceptual loss as the config asks
for it (EA-DISTS, DISTS or none)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import Config
from .dists import DISTS, EADISTS, STAGE_CHANNELS, VGG16_BLOCKS

log = logging.getLogger("d3sr.train")


@functools.lru_cache(maxsize=1)
def random_vgg16_features(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random VGG16 `features.N` tensors (He init): for tests with loss.pretrained_vgg false.
    The last seed's are kept (14.7 M draws, 0.2 s on one core, for every trainer a test makes):
    callers read them (VGG16Trunk copies them) and must not change them."""
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


def pixel_mse(x: torch.Tensor, y: torch.Tensor, pixel_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Mean squared error of two images given in [0, 1] (any equal shapes), computed after mapping
    both linearly to `pixel_range` (loss.mse_range): [0, 1] as given, [-1, 1] as OSEDiff's code
    computes it, which is (hi - lo)^2 = 4 times the [0, 1] value. Returns a scalar tensor."""
    lo, hi = (float(v) for v in pixel_range)
    return F.mse_loss(lo + (hi - lo) * x, lo + (hi - lo) * y)


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
