"""Preemption signals: SIGTERM / SIGUSR1 / SIGUSR2 ask for a checkpoint at the next step boundary.

The handler only sets a flag; the trainer all-reduces it every step, so every rank
stops after the same step even when the signal reached only one of them. A handler
that was installed before ours (e.g. submitit's requeue on SIGUSR2/SIGTERM under the
Hydra SLURM launcher) is called after the checkpoint is saved (``chain()``).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Set by a stop signal (``signum`` records which); checked at step boundaries."""

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

    def chain(self) -> None:
        """Run the handler ours replaced for the received signal, if it was a Python callable."""
        prev = self._previous.get(self.signum)
        if callable(prev):
            self.uninstall()
            prev(self.signum, None)

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
