"""`python -m training.train ARGS` in a process of its own, forked from a server process that has
imported the trainer once (multiprocessing's forkserver, started at the first use in a test
worker).

Each run is a separate process as the command makes one: its own pid (and session, if asked),
the interpreter's default signal handlers, stdout and stderr to a file, the module run as
`__main__` (runpy, as `-m` does) and its exit code. What it shares is the interpreter start and
the imports a CPU run does before it loads the models (4 s of CPU per process on a quiet 2-core
AMD EPYC). One difference: the process ends as multiprocessing ends it (streams flushed, then
os._exit), so atexit handlers do not run; logging's handlers flush every record anyway. The
torchrun test in test_training_gan_processes.py still starts the command from a new interpreter.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import sys
from multiprocessing.process import BaseProcess
from pathlib import Path

from d3sr_core import host

ROOT = Path(__file__).resolve().parents[1]

# What `python -m training.train` imports for a CPU config before it loads the models (its
# _run: ComfyUI's device options first, then the loop and everything the loop imports). The
# objects the imports make live as long as the server: the collector's passes over them while
# importing are skipped (as in the test workers: conftest.pytest_configure), and they are frozen.
_collecting = gc.isenabled()
gc.disable()
host.import_comfy(cpu=True)
import training.loop  # noqa: E402,F401  (imported for the server to hold)

gc.freeze()
if _collecting:
    gc.enable()

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


def _run_module(argv: list[str], output: str, new_session: bool) -> None:
    if new_session:
        os.setsid()
    # The child inherits the start method "forkserver" from the process that asked for it; a
    # new interpreter has Linux's default ("fork"), with which the trainer's DataLoader workers
    # fork from the run (else each would come from a second forkserver the run starts itself).
    multiprocessing.set_start_method(None, force=True)
    os.chdir(ROOT)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Logging as a new interpreter has it: ComfyUI's import-time `logging.warning` calls set up
    # the root logger in the server (basicConfig's defaults, level WARNING), which would make
    # the command's own basicConfig a no-op and hide its INFO lines.
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    sys.argv = ["-m", *argv]      # runpy puts the module's path first, as `python -m` does
    runpy.run_module("training.train", run_name="__main__", alter_sys=True)


def _ensure_server() -> None:
    """Start the server once, with this folder and the pack on PYTHONPATH: Python 3.11's
    forkserver ignores the sys.path it is handed, and its preload skips a module it cannot
    import without a word (each run would then import everything itself)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(ROOT), *filter(None, [before])])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def start_trainer(argv: list[str], output: Path, new_session: bool = False) -> BaseProcess:
    """Start `python -m training.train *argv` (stdout and stderr to `output`; `new_session`:
    its own session and process group, as Popen's start_new_session). Its exit code is the
    returned process's `exitcode` once joined."""
    _ensure_server()
    proc = _CONTEXT.Process(target=_run_module, args=(list(argv), str(output), new_session))
    proc.start()
    return proc
