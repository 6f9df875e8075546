"""Warnings that cannot flood a log: the first of a period, then a count."""

from __future__ import annotations

import logging
from typing import Protocol

__all__ = ("RateLimitedWarning", "SecondsClock")


class SecondsClock(Protocol):
    """The part of a Twisted reactor (``IReactorTime``) that tells the time."""

    def seconds(self) -> float: ...


class RateLimitedWarning:
    """Logs the first warning of each ``period`` seconds and counts the rest,
    so a stream of bad input costs a handful of log lines, not millions."""

    def __init__(self, logger: logging.Logger, clock: SecondsClock, period: float = 10.0) -> None:
        self._logger = logger
        self._clock = clock
        self._period = period
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = self._clock.seconds()
        if self._last is not None and now - self._last < self._period:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d more like this in the last %.0f s were not logged)"
            args = (*args, self._suppressed, now - self._last if self._last else 0.0)
        self._last, self._suppressed = now, 0
        self._logger.warning(message, *args, exc_info=exc_info)
