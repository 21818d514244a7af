"""D3SR core: weight format, one-step pipeline, tiling and colour fix on ComfyUI's models.

Import-light on purpose: modules that need ComfyUI (`model`, `pipeline`, ...) import it
themselves, so stand-alone tools can call `host.import_comfy()` first.
"""
