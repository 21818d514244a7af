"""The custom socket type shared by the D3SR nodes, their menu category and search words."""

from comfy_api.latest import io

D3SRModelType = io.Custom("D3SR_MODEL")
CATEGORY = "image/upscaling/D3SR"
SEARCH_ALIASES = ["super resolution", "super-resolution", "SR", "upscale", "one-step diffusion"]


def base_model_input() -> io.Model.Input:
    """The loaders' MODEL input: SD2.1-base from the stock checkpoint loader."""
    return io.Model.Input("model", tooltip="MODEL of Stable Diffusion 2.1-base (512, epsilon) "
                          "from the stock Load Checkpoint node.")


def schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list,
           search_words: tuple[str, ...] = ()) -> io.Schema:
    """A D3SR node's io.Schema: the pack's category and node-search words added."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY,
                     **search_options(search_words), description=description, inputs=inputs,
                     outputs=outputs)


def search_options(extra: tuple[str, ...] = ()) -> dict:
    """io.Schema keyword arguments for node-search aliases, where the host's schema has a
    `search_aliases` field. ComfyUI 0.3.75's has none (and its frontend, 1.32.9, searches only
    node ids and display names), so there the display names carry the search words instead."""
    if "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {}):
        return {"search_aliases": [*SEARCH_ALIASES, *extra]}
    return {}
