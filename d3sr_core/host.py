"""Finding and importing a ComfyUI host when running outside ComfyUI (CLI, tests, training)."""

from __future__ import annotations

import gc
import io
import os
import sys
from collections.abc import Callable
from typing import NoReturn

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_comfyui() -> str:
    """The ComfyUI folder: $COMFYUI_PATH, else the folder two levels above the pack (when the pack
    sits in ComfyUI/custom_nodes/), else the pinned host that `make setup` installs in .host/."""
    candidates = [os.environ.get("COMFYUI_PATH", ""),
                  os.path.dirname(os.path.dirname(PACK_ROOT)),
                  os.path.join(PACK_ROOT, ".host", "ComfyUI")]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "main.py")) and \
                os.path.isdir(os.path.join(path, "comfy")):
            return os.path.abspath(path)
    raise RuntimeError("No ComfyUI found: set COMFYUI_PATH to your ComfyUI folder, or run "
                       "`make setup` to install the pinned host into .host/ComfyUI.")


def import_comfy(cpu: bool | None = None) -> str:
    """Put ComfyUI on sys.path and prepare its CLI args before comfy.model_management is
    imported (a CPU-only torch otherwise fails). `cpu=None` picks the CPU when CUDA is absent.
    Returns the ComfyUI folder."""
    # torch here, not at the top: find_comfyui serves callers that need no torch (the test
    # runner's controller process, set-up scripts).
    import torch

    from . import comfy_internals

    root = find_comfyui()
    if root not in sys.path:
        sys.path.insert(0, root)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    comfy_internals.set_device_options(cpu)
    return root


def one_write_per_line() -> None:
    """Make every line printed to stdout and stderr (up to the 8 KiB buffer) leave in one write(2):
    for pipes, writes of up to 4 KiB (PIPE_BUF) are never interleaved. torchrun starts its
    ranks with `python -u`, where print() writes the text and its newline separately, so ranks
    sharing a pipe could mix their lines ("[rank 0] wrote a.png[rank 1] wrote b.png" and two
    newlines). Line buffering without write-through keeps each line whole."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)


def run_main(main: Callable[[], int]) -> NoReturn:
    """`sys.exit(main())` for the command-line entry points, each line of output in one write
    (one_write_per_line) and without Python's last garbage collections: with torch and ComfyUI
    imported, the interpreter's shutdown walks every object they made. gc.freeze() leaves them to
    the OS, which frees the whole process anyway: exit 1.04 -> 0.25 s per process
    (benchmarks/bench_exit.py, results/exit_cpu.md). atexit handlers (logging's flush) and the
    standard streams' flush still run; only finalizers of objects caught in reference cycles are
    skipped, which Python does not promise at exit either."""
    one_write_per_line()
    code = main()
    gc.freeze()
    sys.exit(code)
