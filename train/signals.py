"""Preemption signals: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary.

The handler only sets a flag; the trainer all-reduces it every step, so every rank
stops after the same step even when the signal reached only one of them.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (``signum`` records which); checked at step boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
