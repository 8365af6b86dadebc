"""Progress reporting shared by every long-running routine.

A progress callback receives ``(fraction, stage, message)`` with ``fraction`` in [0, 1] over the
whole job. :class:`ProgressScope` maps the local progress of one step (say, one pyramid level)
into its slice of the whole, so nested routines need not know where they sit.

A scope also carries the job's stage timings (``timings``, seconds by stage name), shared by all
its sub-scopes, so a routine deep inside (one pyramid level) can record where the time went and
``summary.json`` keeps it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

from .errors import RegistrationCancelled

ProgressCallback = Callable[[float, str, str], None]
CancelCallback = Callable[[], bool]


class ProgressScope:
    """Report progress of a sub-task occupying ``[start, stop]`` of the parent's range."""

    def __init__(self, callback: Optional[ProgressCallback] = None, start: float = 0.0,
                 stop: float = 1.0, cancel: Optional[CancelCallback] = None,
                 timings: Optional[Dict[str, float]] = None):
        self.callback = callback
        self.start = float(start)
        self.stop = float(stop)
        self.cancel = cancel
        self.timings: Dict[str, float] = {} if timings is None else timings

    def report(self, fraction: float, stage: str, message: str = "") -> None:
        self.check_cancel()
        if self.callback is not None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            self.callback(self.start + fraction * (self.stop - self.start), stage, message)

    def sub(self, start: float, stop: float) -> "ProgressScope":
        """A child scope covering ``[start, stop]`` of this scope's range."""
        span = self.stop - self.start
        return ProgressScope(self.callback, self.start + start * span, self.start + stop * span,
                             self.cancel, self.timings)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timings[stage]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise RegistrationCancelled("registration cancelled")
