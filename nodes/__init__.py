"""The D3SR nodes and the ComfyUI extension that lists them."""

from comfy_api.latest import ComfyExtension, io

from .loader import D3SRModelLoader
from .osediff_loader import D3SROSEDiffLoader
from .tiled import D3SRTiledUpscale
from .upscale import D3SRUpscale


class D3SRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [D3SRModelLoader, D3SROSEDiffLoader, D3SRUpscale, D3SRTiledUpscale]
