"""D3SRTiledUpscale: one-step diffusion super-resolution of any size, tile by tile."""

from comfy_api.latest import io

from ..d3sr_core.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, upscale_tiled
from .types import CATEGORY
from .upscale import upscale_inputs


class D3SRTiledUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D3SRTiledUpscale",
            display_name="D3SR Tiled Upscale (one step, any size)",
            category=CATEGORY,
            description="D3SR Upscale in bounded memory: VAE encode, the UNet step and VAE decode run "
                        "on overlapping tiles blended smoothly; the colour fix uses the whole image. "
                        "Out of memory halves the tile and retries.",
            inputs=[
                *upscale_inputs(),
                io.Int.Input("tile_size", default=DEFAULT_TILE, min=64, max=4096, step=16,
                             tooltip="UNet tile in OUTPUT pixels. Larger tiles: fewer seams to blend and "
                                     "less overlap recompute, more memory. Halved automatically on "
                                     "out-of-memory."),
                io.Int.Input("tile_overlap", default=DEFAULT_OVERLAP, min=0, max=1024, step=8,
                             tooltip="Overlap between UNet tiles in OUTPUT pixels (at most half a "
                                     "tile); the tiles are cross-faded over it."),
                io.Int.Input("vae_tile_size", default=0, min=0, max=4096, step=64,
                             tooltip="VAE encode/decode tile in OUTPUT pixels; 0 = automatic (512 on "
                                     "CPU, up to 1024 on a GPU as free memory allows)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, d3sr_model, image, upscale_by: float, colour_fix: str, tile_size: int,
                tile_overlap: int, vae_tile_size: int) -> io.NodeOutput:
        return io.NodeOutput(upscale_tiled(d3sr_model, image, upscale_by, colour_fix, tile=tile_size,
                                           overlap=tile_overlap, vae_tile=vae_tile_size))
