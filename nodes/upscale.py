"""D3SRUpscale: one-step diffusion super-resolution of an IMAGE batch."""

from comfy_api.latest import io

from ..d3sr_core.colour_fix import COLOUR_FIXES
from ..d3sr_core.pipeline import MAX_FACTOR
from ..d3sr_core.upscale import upscale
from .types import D3SRModelType, schema


def upscale_inputs() -> list:
    """The inputs D3SRUpscale and D3SRTiledUpscale share."""
    return [
        D3SRModelType.Input("d3sr_model", tooltip="From the Load D3SR Model node."),
        io.Image.Input("image", tooltip="Low-resolution RGB images (a batch is upscaled one by one)."),
        io.Float.Input("upscale_by", default=4.0, min=1.0, max=MAX_FACTOR, step=0.05,
                       tooltip="Output size = round(upscale_by x input size); with OSEDiff weights each "
                               "side is then brought down to a multiple of 8, as OSEDiff does. D3SR is "
                               "trained for 4."),
        io.Combo.Input("colour_fix", options=list(COLOUR_FIXES), default="adain",
                       tooltip="Match the output's colours to the input: adain (per-channel mean and "
                               "std), wavelet (keep the input's low frequencies) or none."),
    ]


class D3SRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "D3SRUpscale", "D3SR Super-Resolution",
            description="Upscales images (super-resolution) in one diffusion step: bicubic upsample, "
                        "VAE encode, one UNet evaluation at the stored timestep, VAE decode.",
            inputs=upscale_inputs(),
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, d3sr_model, image, upscale_by: float, colour_fix: str) -> io.NodeOutput:
        return io.NodeOutput(upscale(d3sr_model, image, upscale_by, colour_fix))
