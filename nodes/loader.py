"""D3SRModelLoader: MODEL + VAE + a D3SR weight file -> D3SR_MODEL."""

from comfy_api.latest import io

from ..d3sr_core.model import load_d3sr
from .types import D3SRModelType, base_model_input, schema
from .weights import D3SR_EXTENSIONS, WeightFileLoader, list_weights, missing_d3sr_message


class D3SRModelLoader(WeightFileLoader):
    TITLE, EXTENSIONS, MISSING = "Load D3SR Model", D3SR_EXTENSIONS, staticmethod(missing_d3sr_message)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "D3SRModelLoader", cls.TITLE,
            description="Applies a D3SR one-step super-resolution weight file (UNet LoRA, fixed "
                        "text embedding and timestep) to Stable Diffusion 2.1-base.",
            inputs=[
                base_model_input(),
                io.Vae.Input("vae", tooltip="VAE of the same SD2.1-base checkpoint."),
                io.Combo.Input("weights", options=list_weights(D3SR_EXTENSIONS),
                               tooltip="D3SR weight file (.safetensors) from ComfyUI/models/d3sr/. No "
                                       "official D3SR weights exist yet: train them (docs/training.md), "
                                       "or use Load OSEDiff Model with OSEDiff's released weights."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="LoRA strength; 1.0 is what the weights were trained for."),
            ],
            outputs=[D3SRModelType.Output(display_name="d3sr_model")],
            search_words=("load d3sr",),
        )

    @classmethod
    def execute(cls, model, vae, weights: str, strength: float) -> io.NodeOutput:
        path = cls.weights_path(weights)
        return io.NodeOutput(load_d3sr(model, vae, path, strength))
