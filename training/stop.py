"""Stop signals (SIGINT, SIGTERM) for a training run.

Before the first training step there is nothing to save: a signal raises StopRequested at once
(the CLI prints it and exits with 128 + the signal number). Once the loop runs (`defer()`), a
signal lets the current step finish; the loop then writes a checkpoint and stops.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("d3sr.train")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """SIGINT/SIGTERM before the first training step. A BaseException (as KeyboardInterrupt), so
    that no `except Exception` on the way (e.g. around an unreadable image) swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} before the first training step "
                         "(no checkpoint was written)")


class StopSignal:
    """Installs SIGINT/SIGTERM handlers (main thread only) until `restore()`: before `defer()`
    a signal raises StopRequested; after it, it sets `signum`, checked by the loop after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._raised = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def defer(self) -> None:
        """From now on a signal finishes the current step and checkpoints before stopping."""
        self.deferred = True

    def enter_loop(self) -> None:
        """Right before the first step: a signal that came while starting still stops the run
        now (even if a library's bare `except:` swallowed its StopRequested); later ones defer."""
        if self.signum is not None:
            raise StopRequested(self.signum)
        self.defer()

    def stop_request(self, error: BaseException) -> StopRequested | None:
        """The stop behind `error`, which ended the run before its first step: `error` itself, or,
        when a handler raised StopRequested inside a library that turned it into an error of its
        own (safetensors' reader gives a ValueError), a StopRequested for that signal. None for an
        error no stop signal caused."""
        if isinstance(error, StopRequested):
            return error
        if self._raised and isinstance(error, Exception):
            return StopRequested(self.signum)
        return None

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        first, self.signum = self.signum is None, signum
        if not self.deferred:
            self._raised = True
            raise StopRequested(signum)
        if first:
            log.warning("received %s: finishing this step, then writing a checkpoint",
                        signal.Signals(signum).name)


def workers_ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C / SIGTERM go to the whole process group, but only the main
    process should act on them (finish the step, checkpoint); the workers keep feeding it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
