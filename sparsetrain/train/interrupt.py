"""Stopping a run from outside. The first SIGTERM or SIGINT (Ctrl-C) asks the loop to finish its
step, save a checkpoint and exit with EXIT_CODES[signal]; a second one ends the process at once,
without saving.

Python runs signal handlers only between bytecodes of the main thread, so while the main thread sits
in a long compile or step every Ctrl-C would wait for it. The signals are therefore also written to a
wakeup pipe (`signal.set_wakeup_fd`, done in C as each one arrives) that a watcher thread reads.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The shell's convention for "ended by signal N" (128 + N): what schedulers and scripts test for.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequests:
    """Context manager; `.signum` is the first stop signal received, or None."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum: int | None = None

    def __enter__(self) -> "StopRequests":
        # A no-op Python handler: it replaces the default KeyboardInterrupt; the watcher does the work.
        self.previous = {s: signal.signal(s, lambda signum, frame: None) for s in SIGNALS}
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self._watch, name="stop-requests", daemon=True)
        self.watcher.start()
        return self

    def _watch(self) -> None:
        while data := os.read(self.read_fd, 1):   # empty once __exit__ closes the write end
            if data[0] not in SIGNALS:
                continue
            if self.signum is None:
                self.signum = data[0]
                self.log(f"received signal {self.signum}: saving a checkpoint after this step, then exiting "
                         f"(send it again to exit at once, without saving)")
            else:
                os.write(2, f"received signal {data[0]} again: exiting now, without saving\n".encode())
                os._exit(EXIT_CODES[data[0]])

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        os.close(self.write_fd)
        self.watcher.join()
        os.close(self.read_fd)
