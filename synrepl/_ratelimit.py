"""Warnings that cannot flood a log: the first of a period, then a count.

Pure: the clock is anything with a ``seconds()`` method (a Twisted reactor,
``asyncio``'s loop wrapped, or a test's fake), so every adapter can use it.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

__all__ = ("RateLimitedWarning", "SecondsClock", "MonotonicClock")


class SecondsClock(Protocol):
    """Whatever tells the time in seconds (a reactor's ``IReactorTime``, ...)."""

    def seconds(self) -> float: ...


class MonotonicClock:
    """``seconds()`` from the monotonic clock, for code that has no reactor."""

    def seconds(self) -> float:
        return time.monotonic()


class RateLimitedWarning:
    """Logs the first warning of each ``period`` seconds and counts the rest,
    so a stream of bad input costs a handful of log lines, not millions."""

    def __init__(self, logger: logging.Logger, clock: SecondsClock, period: float = 10.0) -> None:
        self._logger = logger
        self._clock = clock
        self._period = period
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *args: object, exc_info: bool | BaseException = False) -> None:
        now = self._clock.seconds()
        last = self._last
        if last is not None and now - last < self._period:
            self._suppressed += 1
            return
        if self._suppressed and last is not None:
            message += " (%d more like this in the last %.0f s were not logged)"
            args = (*args, self._suppressed, now - last)
        self._last, self._suppressed = now, 0
        self._logger.warning(message, *args, exc_info=exc_info)
