"""The weight files the two loaders offer from ComfyUI/models/d3sr/: which names each lists,
what to say when the picked one is not there, and a fingerprint that changes when the file
does (so ComfyUI runs the loader again after the trainer rewrites it)."""

from __future__ import annotations

import os
from collections.abc import Callable

import folder_paths
from comfy_api.latest import io

FOLDER = "d3sr"
SAFETENSORS = (".safetensors", ".sft")
D3SR_EXTENSIONS = SAFETENSORS                   # load_d3sr reads D3SR .safetensors files only
OSEDIFF_EXTENSIONS = (".pkl", *SAFETENSORS)     # osediff.pkl as released, or converted to D3SR format
OSEDIFF_URL = "https://raw.githubusercontent.com/cswry/OSEDiff/main/preset/models/osediff.pkl"
CONVERT_COMMAND = "python -m d3sr_core.osediff convert osediff.pkl osediff.safetensors"


def list_weights(extensions: tuple[str, ...]) -> list[str]:
    """Names in models/d3sr/ (and extra_model_paths.yaml's d3sr paths) ending in `extensions`."""
    return [n for n in folder_paths.get_filename_list(FOLDER) if n.lower().endswith(extensions)]


def _folder_state(extensions: tuple[str, ...]) -> str:
    folders = folder_paths.get_folder_paths(FOLDER)
    where = folders[0] if len(folders) == 1 else " or ".join(folders)
    count = len(list_weights(extensions))
    return f"{where} holds {'no' if count == 0 else count} {'/'.join(extensions)} file{'s' if count != 1 else ''}"


def missing_d3sr_message(name: str) -> str:
    """One line: the D3SR file is not there, no official weights exist, what to do instead."""
    return (f"D3SR weight file '{name}' not found ({_folder_state(D3SR_EXTENSIONS)}). No official "
            "D3SR weights have been released: train your own (docs/training.md in this node pack) "
            "and put the .safetensors file there, or use the 'Load OSEDiff Model' node, which gives "
            f"real results today with OSEDiff's released osediff.pkl ({OSEDIFF_URL}).")


def missing_osediff_message(name: str) -> str:
    """One line: the OSEDiff file is not there, where to download it and where it goes."""
    return (f"OSEDiff weight file '{name}' not found ({_folder_state(OSEDIFF_EXTENSIONS)}). Download "
            f"osediff.pkl from {OSEDIFF_URL} into that folder and press R in ComfyUI to refresh the "
            f"list (or convert it first: {CONVERT_COMMAND}).")


def _wrong_kind(name: str, extensions: tuple[str, ...], node: str) -> str:
    return (f"'{name}' cannot be loaded by '{node}': it takes {'/'.join(extensions)} files. "
            + ("OSEDiff's osediff.pkl goes in 'Load OSEDiff Model'." if name.lower().endswith(".pkl")
               else "Pick another file."))


def weights_path(name: str, extensions: tuple[str, ...], node: str, missing) -> str:
    """The full path of `name` in models/d3sr/; ValueError when `node` cannot load that kind of
    file, FileNotFoundError with `missing(name)` when it is not there."""
    if not name.lower().endswith(extensions):
        raise ValueError(_wrong_kind(name, extensions, node))
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(missing(name))
    return path


def check_weights(name: str | None, extensions: tuple[str, ...], node: str, missing) -> str | None:
    """None when `name` can be loaded by `node`, else weights_path's one-line message (for a
    node's validate_inputs, so the run stops before anything is loaded)."""
    if name is None:  # the widget was turned into a linked input: checked when it runs
        return None
    try:
        weights_path(name, extensions, node, missing)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def fingerprint(name: str | None) -> tuple | None:
    """(path, size, mtime_ns, inode) of the picked file: changes when the file is rewritten or
    replaced, so ComfyUI's cache runs the loader again; None when it is not there (the run then
    fails with the loader's message)."""
    if name is None:
        return None
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_size, st.st_mtime_ns, st.st_ino)


class WeightFileLoader(io.ComfyNode):
    """Base of the two loaders: the `weights` widget is checked before the run (validate_inputs:
    the run stops with the one-line message, nothing loaded), and its fingerprint makes
    ComfyUI run the loader again when the file changes. Subclasses set TITLE, EXTENSIONS and
    MISSING (the "not found" message) and define the schema and execute."""

    TITLE: str = ""
    EXTENSIONS: tuple[str, ...] = SAFETENSORS
    MISSING: Callable[[str], str] = staticmethod(missing_d3sr_message)

    @classmethod
    def validate_inputs(cls, weights: str | None = None) -> bool | str:
        return check_weights(weights, cls.EXTENSIONS, cls.TITLE, cls.MISSING) or True

    @classmethod
    def fingerprint_inputs(cls, weights: str | None = None, **_) -> tuple | None:
        return fingerprint(weights)

    @classmethod
    def weights_path(cls, weights: str) -> str:
        return weights_path(weights, cls.EXTENSIONS, cls.TITLE, cls.MISSING)
