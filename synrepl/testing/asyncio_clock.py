"""Virtual time for asyncio tests, as :mod:`synrepl.testing.clock` is for Twisted.

:class:`VirtualEventLoop` is an asyncio event loop whose clock only moves
when nothing is ready to run: then it jumps to the next timer, so
``asyncio.sleep(60)`` returns at once and a minute of reconnect backoff
passes in no time.  Real file descriptors are still polled (without
waiting), so the loop's own machinery works; a coroutine that waits for
real I/O with no timer pending raises :class:`~synrepl.testing.clock.StuckError`.

:class:`AsyncioVirtualTime` puts an in-memory Redis, an
:class:`~synrepl.testing.asyncio_homeserver.AsyncioHomeserver` and the
asyncio ``ReplicationClient`` on such a loop::

    time = AsyncioVirtualTime()

    async def scenario() -> None:
        hs = await time.homeserver()
        client = time.client(hs)
        ...

    time.run(scenario())
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from synrepl.testing.asyncio_homeserver import AsyncioHomeserver
from synrepl.testing.clock import StuckError
from synrepl.testing.memory import MemoryRedis

__all__ = ("VirtualEventLoop", "AsyncioVirtualTime", "in_own_thread")

_T = TypeVar("_T")


def in_own_thread(call: Callable[[], _T], name: str = "synrepl-own-thread") -> _T:
    """``call()`` on a thread of its own, where no event loop runs; its
    result, or its exception raised here."""
    outcome: list[tuple[bool, Any]] = []

    def body() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: _T = value
    return result


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without waiting; a wait becomes a jump of the loop's clock."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualEventLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise StuckError(
                "the scenario waits for something nothing on the loop will do "
                "(real I/O, a thread or another loop in a virtual-time test?)"
            )
        assert self.loop is not None
        self.loop.now += timeout
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time (see the module docs)."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        #: The virtual time, in seconds.
        self.now = 0.0

    def time(self) -> float:
        return self.now


class AsyncioVirtualTime:
    """A :class:`VirtualEventLoop` with Redis in memory on it."""

    _running: ClassVar[list[AsyncioVirtualTime]] = []

    @classmethod
    def running(cls) -> AsyncioVirtualTime | None:
        """The innermost ``AsyncioVirtualTime`` whose :meth:`run` is under way."""
        return cls._running[-1] if cls._running else None

    def __init__(self) -> None:
        self.loop = VirtualEventLoop()
        #: The in-memory Redis on that loop.
        self.redis = MemoryRedis.for_asyncio(self.loop)

    def run(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` to its end on the virtual loop and close the loop.

        From inside another running loop (a test under an asyncio reactor),
        the virtual loop runs in a thread of its own, and this call waits.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._run_here(work)
        return in_own_thread(lambda: self._run_here(work), "synrepl-virtual-loop")

    def _run_here(self, work: Coroutine[Any, Any, _T]) -> _T:
        self._running.append(self)
        try:
            with asyncio.Runner(loop_factory=lambda: self.loop) as runner:
                return runner.run(work)
        finally:
            self._running.remove(self)

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass."""
        await asyncio.sleep(seconds)

    async def homeserver(self, **kwargs: Any) -> AsyncioHomeserver:
        """A started :class:`AsyncioHomeserver` on the in-memory Redis."""
        kwargs.setdefault("transport_factory", self.redis.connect)
        hs = AsyncioHomeserver(**kwargs)
        await hs.start()
        return hs

    def client(self, hs: AsyncioHomeserver, **kwargs: Any) -> Any:
        """An asyncio ``ReplicationClient`` of ``hs``'s cluster, not started."""
        from synrepl.asyncio import ReplicationClient

        config = kwargs.pop("config", None) or hs.config()
        kwargs.setdefault("fetcher", hs.fetcher())
        kwargs.setdefault("transport_factory", self.redis.connect)
        return ReplicationClient(config, **kwargs)
