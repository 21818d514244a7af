"""D3SR for ComfyUI: one-step diffusion super-resolution (arXiv 2410.04224).

ComfyUI entry point (V3): registers the `d3sr` model folder and the D3SR nodes.
"""

import os

import folder_paths

from .nodes import D3SRExtension


def _register_model_folder() -> None:
    """models/d3sr/ with the usual model extensions; extra_model_paths.yaml may add paths."""
    default = os.path.join(folder_paths.models_dir, "d3sr")
    paths, _ = folder_paths.folder_names_and_paths.get("d3sr", ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths["d3sr"] = (paths, set(folder_paths.supported_pt_extensions))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # a read-only models folder is fine: the list is then just empty
        pass


_register_model_folder()


async def comfy_entrypoint() -> D3SRExtension:
    return D3SRExtension()
