"""The plain upscale as the nodes and the CLI call it: the whole image in one piece, and on
out-of-memory the same image again through tiles.

It sits above both `pipeline` (the one-step math on one piece) and `tiling` (the same math on
tiles, which builds on `pipeline`), so neither of those imports the other in a cycle.
Images are ComfyUI IMAGE tensors [B, H, W, C] in [0, 1] unless a docstring says BCHW.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
import torch

from . import pipeline, tiling
from .checks import check_factor
from .model import D3SRModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def upscale(d3sr: D3SRModel, image: torch.Tensor, factor: float = 4.0, colour_fix: str = "adain"
            ) -> torch.Tensor:
    """ComfyUI IMAGE [B, h, w, 3] -> IMAGE [B, round(f*h), round(f*w), 3] (for OSEDiff weights
    each side brought down to a multiple of 8, as OSEDiff does: pipeline.result_size), one
    image at a time with a progress bar; ComfyUI's interrupt is honoured between images. An
    image that runs out of memory is retried through tiles (`upscale_after_oom`). ValueError for
    a bad image (shape, NaN/Inf pixels) or factor; NonFiniteOutputError if the result is not
    finite; D3SROutOfMemoryError if even the smallest tiles do not fit."""
    pipeline.check_image(image)
    factor = check_factor(factor)
    pbar = comfy.utils.ProgressBar(image.shape[0])
    outputs = []
    for i in range(image.shape[0]):
        mm.throw_exception_if_processing_interrupted()
        lr = image[i: i + 1].movedim(-1, 1)
        oom = False
        try:
            outputs.append(pipeline.upscale_one(d3sr, lr, factor, colour_fix))
        except Exception as e:
            if not pipeline.is_out_of_memory(e):
                raise
            oom = True  # handled outside the except block so the failed pass's tensors are freed
        if oom:
            mm.soft_empty_cache()
            outputs.append(upscale_after_oom(d3sr, lr, factor, colour_fix))
        pbar.update(1)
    return torch.cat(outputs).movedim(1, -1)


def upscale_after_oom(d3sr: D3SRModel, lr: torch.Tensor, factor: float, colour_fix: str
                      ) -> torch.Tensor:
    """The plain path's fallback: BCHW [1, 3, h, w] that did not fit in one piece -> BCHW output
    through tiles, starting from half the longer output side (at most tiling.DEFAULT_TILE); the
    tiled path halves the tile down to tiling.MIN_TILE, logging what it does, and raises
    D3SROutOfMemoryError if even that does not fit."""
    out_h, out_w = pipeline.output_size(lr.shape[-2], lr.shape[-1], factor)
    half = -(-(max(out_h, out_w) // 2) // 8) * 8
    tile = max(tiling.MIN_TILE, min(tiling.DEFAULT_TILE, half))
    logger.warning("D3SR: out of memory upscaling %dx%d to %dx%d in one piece on %s; retrying "
                   "with %d px tiles.", lr.shape[-1], lr.shape[-2], out_w, out_h,
                   mm.get_torch_device(), tile)
    return tiling.upscale_tiled(d3sr, lr.movedim(1, -1), factor, colour_fix, tile=tile).movedim(-1, 1)
