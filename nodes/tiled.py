"""D3SRTiledUpscale: one-step diffusion super-resolution of any size, tile by tile."""

import logging

from comfy_api.latest import io

from ..d3sr_core.pipeline import pixel_multiple
from ..d3sr_core.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, upscale_tiled
from .types import schema
from .upscale import upscale_inputs

logger = logging.getLogger(__name__)
SD21_MULTIPLE = 64   # SD2.1's UNet downsamples 3 times: tiles and overlaps move in 64-px steps
MAX_TILE = 4096


def effective_tiles(multiple: int, tile: int, overlap: int) -> tuple[int, int]:
    """(tile, overlap) in output pixels as d3sr_core.tiling uses them for a model whose pixel
    sizes are multiples of `multiple`: the tile rounded to the nearest multiple (at least one),
    the overlap rounded up to whole multiples and capped at half the tile (tile_plan + layout)."""
    align = multiple // 8
    tile_lat = max(align, round(tile / multiple) * align)
    overlap_lat = -(-round(overlap / 8) // align) * align
    return tile_lat * 8, max(0, min(overlap_lat, tile_lat // 2 // align * align)) * 8


def adjustment_note(multiple: int, tile: int, overlap: int) -> str | None:
    """One sentence naming what the tiled path changes in `tile`/`overlap`, or None."""
    eff_tile, eff_overlap = effective_tiles(multiple, tile, overlap)
    parts = []
    if eff_tile != tile:
        parts.append(f"tile_size {tile} -> {eff_tile} px (a multiple of {multiple} for this model)")
    if eff_overlap != overlap:
        why = (f"at most half a tile, in {multiple}-px steps" if eff_overlap < overlap
               else f"rounded up to {multiple}-px steps")
        parts.append(f"tile_overlap {overlap} -> {eff_overlap} px ({why})")
    return "D3SR Tiled: " + "; ".join(parts) + "." if parts else None


class D3SRTiledUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "D3SRTiledUpscale", "D3SR Super-Res (tiled)",
            description="D3SR Upscale in bounded memory: VAE encode, the UNet step and VAE decode run "
                        "on overlapping tiles blended smoothly; the colour fix uses the whole image. "
                        "Out of memory halves the tile and retries.",
            inputs=[
                *upscale_inputs(),
                io.Int.Input("tile_size", default=DEFAULT_TILE, min=SD21_MULTIPLE, max=MAX_TILE,
                             step=SD21_MULTIPLE,
                             tooltip="UNet tile in OUTPUT pixels, in 64-px steps (SD2.1's UNet needs "
                                     "multiples of 64). Larger tiles: fewer seams to blend and less "
                                     "overlap recompute, more memory. Halved automatically on "
                                     "out-of-memory."),
                io.Int.Input("tile_overlap", default=DEFAULT_OVERLAP, min=0, max=MAX_TILE // 2,
                             step=SD21_MULTIPLE,
                             tooltip="Overlap between UNet tiles in OUTPUT pixels, in 64-px steps and "
                                     "at most half the tile (larger values are capped, with a log "
                                     "line); the tiles are cross-faded over it."),
                io.Int.Input("vae_tile_size", default=0, min=0, max=MAX_TILE, step=64,
                             tooltip="VAE encode/decode tile in OUTPUT pixels; 0 = automatic (512 on "
                                     "CPU, up to 1024 on a GPU as free memory allows)."),
            ],
            outputs=[io.Image.Output()],
            search_words=("tiled", "any size"),
        )

    @classmethod
    def execute(cls, d3sr_model, image, upscale_by: float, colour_fix: str, tile_size: int,
                tile_overlap: int, vae_tile_size: int) -> io.NodeOutput:
        note = adjustment_note(pixel_multiple(d3sr_model.model.model), tile_size, tile_overlap)
        if note:
            logger.warning(note)
        return io.NodeOutput(upscale_tiled(d3sr_model, image, upscale_by, colour_fix, tile=tile_size,
                                           overlap=tile_overlap, vae_tile=vae_tile_size))
