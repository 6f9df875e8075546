"""Virtual time for Twisted tests: a worker's whole life in a few milliseconds.

:class:`VirtualTime` runs a coroutine on a ``task.Clock`` as if the clock
were an event loop: whenever nothing else can happen, time jumps to the next
timer.  With Redis in memory (:class:`~synrepl.testing.memory.MemoryRedis`)
and the simulated homeserver's history served in process, a test of a
worker neither sleeps nor touches the network, runs the same way every
time, and can let a minute of Redis outage pass in no time.  Because
:meth:`VirtualTime.run` is synchronous, it works inside Hypothesis's
``@given`` (one fresh ``VirtualTime`` per example) and under any test
runner, with or without pytest-twisted.

Usage::

    def test_every_row_once() -> None:
        time = VirtualTime()

        async def scenario() -> None:
            hs = await time.homeserver()
            client = time.client(hs)
            ...

        time.run(scenario())
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from twisted.internet import defer, task
from twisted.python.failure import Failure

from synrepl.testing.homeserver import FakeHomeserver
from synrepl.testing.memory import MemoryRedis
from synrepl.twisted.client import ReplicationClient

__all__ = ("VirtualTime", "StuckError")

_T = TypeVar("_T")


class StuckError(AssertionError):
    """The scenario waits for something nothing on the clock will ever do:
    real I/O, a thread or a real timer in a virtual-time test."""


class VirtualTime:
    """A ``task.Clock`` run as an event loop, with Redis in memory on it."""

    _running: ClassVar[list[VirtualTime]] = []

    def __init__(self) -> None:
        #: The clock: pass it wherever a reactor is wanted.
        self.clock = task.Clock()
        #: The in-memory Redis on that clock.
        self.redis = MemoryRedis(self.clock)

    @classmethod
    def running(cls) -> VirtualTime | None:
        """The innermost ``VirtualTime`` whose :meth:`run` is under way."""
        return cls._running[-1] if cls._running else None

    def run(self, work: Coroutine[Any, Any, _T], limit: float = 86_400.0) -> _T:
        """Run ``work`` to its end and return its result (or raise its error).

        Raises:
            StuckError: ``work`` waits and nothing is scheduled on the clock,
                or only after ``limit`` virtual seconds.
        """
        self._running.append(self)
        try:
            d = defer.ensureDeferred(work)
            while not d.called:
                calls: Any = self.clock.getDelayedCalls()
                pending = [call.getTime() for call in calls]
                if not pending:
                    d.cancel()
                    raise StuckError(
                        "the scenario waits for something nothing on the clock will do "
                        "(real I/O, a thread or a real timer in a virtual-time test?)"
                    )
                if min(pending) > limit:
                    raise StuckError(f"still waiting after {limit:g} virtual seconds")
                self.clock.advance(max(0.0, min(pending) - self.clock.seconds()))
            results: list[Any] = []
            d.addBoth(results.append)
            if isinstance(results[0], Failure):
                results[0].raiseException()
            result: _T = results[0]
            return result
        finally:
            self._running.remove(self)

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass."""
        clock: Any = self.clock  # IReactorTime: zope interfaces do not type-check
        await task.deferLater(clock, seconds, lambda: None)

    async def homeserver(self, **kwargs: Any) -> FakeHomeserver:
        """A started :class:`FakeHomeserver` on this clock and in-memory Redis,
        its history served in process (arguments as FakeHomeserver's)."""
        kwargs.setdefault("transport_factory", self.redis.connect)
        kwargs.setdefault("http", False)
        hs = FakeHomeserver(self.clock, **kwargs)
        await hs.start()
        return hs

    def client(self, hs: FakeHomeserver, **kwargs: Any) -> ReplicationClient:
        """A ``ReplicationClient`` of ``hs``'s cluster on this clock, not started
        (arguments as ReplicationClient's; ``config`` defaults to ``hs.config()``)."""
        config = kwargs.pop("config", None) or hs.config()
        kwargs.setdefault("fetcher", hs.fetcher())
        kwargs.setdefault("transport_factory", self.redis.connect)
        return ReplicationClient(self.clock, config, **kwargs)
