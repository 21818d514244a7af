"""The custom socket type shared by the D3SR nodes."""

from comfy_api.latest import io

D3SRModelType = io.Custom("D3SR_MODEL")
CATEGORY = "image/upscaling/D3SR"
