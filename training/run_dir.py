"""The run's output folder: writable, and held by one training run at a time.

`RunLock` takes an exclusive `fcntl.flock` on `<output_dir>/train.lock` for the life of the run.
The kernel drops the lock when the process ends in any way (even `kill -9`), so a lock file
left behind by a dead run never blocks: the next run takes it over and names the run that left
it. The file records the holder (`pid`, `host`, start time) so that a refused run can say who
holds the folder. It is written in place, not through d3sr_core.atomic_file: replacing the
file would replace the locked inode.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import tempfile
import time

from .config import ConfigError

log = logging.getLogger("d3sr.train")
LOCK_NAME = "train.lock"


class OutputDirBusyError(ConfigError):
    """Another live training run holds the output folder's lock."""


def check_output_dir(path: str) -> None:
    """ConfigError unless `path` is (or can be created as) a folder this process can write to.
    Creates the folder; leaves nothing else behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir '{path}' is a file, not a folder: set output_dir to a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output_dir '{path}' is not writable ({e.strerror or e}): choose a folder "
                          "you can write to (output_dir in the config, or --output-dir)") from None


def _describe(holder: dict[str, str]) -> str:
    """'pid 123 on host h (started 2025-01-01 10:00:00)' from the lock file's fields."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    return text + (f" (started {holder['started']})" if holder.get("started") else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock on an output folder; `acquire()` then `release()` (or use `with`)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: int | None = None

    def _read_holder(self, fd: int) -> dict[str, str]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def acquire(self) -> RunLock:
        """Take the lock or raise OutputDirBusyError naming the live run that holds it. A lock
        file left by a run that is gone is taken over with a warning naming that run."""
        check_output_dir(self.output_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"output_dir '{self.output_dir}': cannot lock {LOCK_NAME} "
                                  f"({e.strerror or e})") from None
            raise OutputDirBusyError(
                f"output_dir '{self.output_dir}' is in use by another training run ({_describe(holder)}): "
                "wait for it to end, stop it, or set another output_dir (nothing was changed)") from None
        holder = self._read_holder(fd)
        if holder.get("pid"):
            same_host = holder.get("host") == socket.gethostname()
            state = ("that process is gone" if same_host and holder["pid"].isdigit()
                     and not _pid_alive(int(holder["pid"])) else "it no longer holds the lock")
            log.warning("output_dir '%s': taking over a stale lock left by %s; %s (the run ended "
                        "without releasing it, e.g. killed)", self.output_dir, _describe(holder), state)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                      f"started={time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
