"""D3SR for ComfyUI: one-step diffusion super-resolution (arXiv 2410.04224).

ComfyUI entry point (V3): registers the `d3sr` model folder and the D3SR nodes, and puts the
templates' example image into ComfyUI's input folder (once; a file of that name is never
replaced).
"""

import logging
import os
import shutil
import tempfile

import folder_paths

EXAMPLE_IMAGE = "d3sr_example_lr.png"   # what the templates' Load Image node opens
_PACK = os.path.dirname(os.path.abspath(__file__))


def _register_model_folder() -> None:
    """models/d3sr/ with the usual model extensions; extra_model_paths.yaml may add paths."""
    from .d3sr_core.comfy_internals import register_model_folder
    default = os.path.join(folder_paths.models_dir, "d3sr")
    register_model_folder("d3sr", default)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # a read-only models folder is fine: the list is then just empty
        pass


def _install_example_image() -> None:
    """Copy workflows/d3sr_example_lr.png into the input folder unless a file of that name is
    there, so the templates run as shipped. Written to a temporary file and hard-linked into
    place, which never replaces a file and never leaves a partial one. A read-only input folder
    only costs a log line."""
    folder = folder_paths.get_input_directory()
    dest = os.path.join(folder, EXAMPLE_IMAGE)
    if os.path.exists(dest):
        return
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".d3sr-example-", suffix=".png", dir=folder)
        with os.fdopen(fd, "wb") as out, open(os.path.join(_PACK, "workflows", EXAMPLE_IMAGE), "rb") as src:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.link(tmp, dest)
    except FileExistsError:
        pass
    except OSError as e:
        logging.warning("D3SR: could not copy the templates' example image to %s (%s); pick "
                        "another image in the templates' Load Image node.", dest, e)
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


# ComfyUI imports the pack as a package. pytest also imports this file, as a lone module when
# the clone's folder name is not a Python name (e.g. comfyui-d3sr): then there is no package
# to import the nodes from and nothing to register.
if __package__:
    _register_model_folder()
    _install_example_image()


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's extension with its four nodes."""
    from .nodes import D3SRExtension
    return D3SRExtension()
