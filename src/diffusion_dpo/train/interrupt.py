"""Ctrl-C / SIGTERM during training: finish the current optimizer step, save a checkpoint, stop.

A run stopped this way resumes exactly where it stopped (no step redone or lost). A second signal stops
at once (KeyboardInterrupt), and the trainer then names the last checkpoint a rerun continues from.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger("diffusion_dpo")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.received:` at each step boundary.

    Handlers are installed only in the main thread (Python allows no other); elsewhere signals keep their
    default effect."""

    def __init__(self):
        self.received: Optional[str] = None  # name of the first signal caught
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (send it again to stop now)",
                    self.received)
