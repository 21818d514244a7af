"""D3SROSEDiffLoader: MODEL + VAE + OSEDiff weights (+ optional CLIP and prompt) -> D3SR_MODEL."""

from comfy_api.latest import io

from ..d3sr_core.osediff import load_osediff
from .types import D3SRModelType, base_model_input, schema
from .weights import OSEDIFF_EXTENSIONS, WeightFileLoader, list_weights, missing_osediff_message


class D3SROSEDiffLoader(WeightFileLoader):
    TITLE, EXTENSIONS, MISSING = "Load OSEDiff Model", OSEDIFF_EXTENSIONS, staticmethod(missing_osediff_message)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "D3SROSEDiffLoader", cls.TITLE,
            description="Applies OSEDiff's released one-step SR weights (osediff.pkl from "
                        "github.com/cswry/OSEDiff, or a file converted from it) to Stable Diffusion "
                        "2.1-base: UNet LoRA and conv_in, VAE-encoder LoRA (on a copy of the VAE), "
                        "timestep 999, conditioning from CLIP and a prompt. Feeds the D3SR Upscale "
                        "nodes.",
            inputs=[
                base_model_input(),
                io.Vae.Input("vae", tooltip="VAE of the same checkpoint. It is not changed: the "
                             "OSEDiff encoder LoRA goes on a copy."),
                io.Combo.Input("weights", options=list_weights(OSEDIFF_EXTENSIONS),
                               tooltip="osediff.pkl (or its converted .safetensors) from "
                                       "ComfyUI/models/d3sr/."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scales the UNet/VAE LoRA and the conv_in change; 1.0 is "
                                       "OSEDiff as released."),
                io.Clip.Input("clip", optional=True,
                              tooltip="CLIP of the SD2.1-base checkpoint: encodes the prompt. Needed "
                                      "for osediff.pkl."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="What the image shows, e.g. tags like 'building, sky, tree' "
                                        "(OSEDiff was trained with tagger prompts). Empty works, "
                                        "with somewhat less detail. Read literally, as OSEDiff "
                                        "does: ComfyUI's (word:1.2) emphasis and embedding: "
                                        "syntax do not apply; brackets are plain text. Only the "
                                        "first 75 tokens count."),
            ],
            outputs=[D3SRModelType.Output(display_name="d3sr_model")],
            search_words=("osediff",),
        )

    @classmethod
    def execute(cls, model, vae, weights: str, strength: float, clip=None,
                prompt: str = "") -> io.NodeOutput:
        path = cls.weights_path(weights)
        return io.NodeOutput(load_osediff(model, vae, path, clip=clip, prompt=prompt or "",
                                          strength=strength))
