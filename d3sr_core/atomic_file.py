"""Atomic file writes: every file this project writes goes through `atomic_path`.

The content is written to a hidden temporary sibling, fsynced, given the permissions a plain
`open(path, "w")` would give (the umask's, or the replaced file's own mode), then renamed over
`path`. A reader (ComfyUI, another rank, a crashed run's resume) never sees half a file, and a
failed write leaves the old file untouched and no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator


def _read_umask() -> int:
    umask = os.umask(0o022)  # there is no getter: set, then restore (once, at import)
    os.umask(umask)
    return umask


_NEW_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path in `path`'s folder (created if missing) to write to; on success
    it is fsynced and renamed to `path`, on any exception it is removed. `durable=False` skips
    the fsync (still atomic; for files made again on every run, such as generated test models)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}.", dir=folder)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else _NEW_FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
