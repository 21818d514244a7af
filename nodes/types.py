"""The custom socket type shared by the D3SR nodes, their menu category and search words."""

from comfy_api.latest import io

D3SRModelType = io.Custom("D3SR_MODEL")
CATEGORY = "image/upscaling/D3SR"
SEARCH_ALIASES = ["super resolution", "super-resolution", "SR", "upscale", "one-step diffusion"]


def search_options(extra: tuple[str, ...] = ()) -> dict:
    """io.Schema keyword arguments for node-search aliases, where the host's schema has a
    `search_aliases` field. ComfyUI 0.3.75's has none (and its frontend, 1.32.9, searches only
    node ids and display names), so there the display names carry the search words instead."""
    if "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {}):
        return {"search_aliases": [*SEARCH_ALIASES, *extra]}
    return {}
